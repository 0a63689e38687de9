"""Where a registry entry's weights are, found without reading them: a local folder, a snapshot in the Hugging
Face cache, or a file inside an installed Python distribution. The backends' ``weights`` functions build on
these; availability, provenance and the memory check read the :class:`Weights` they return.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clemserve.registry import ModelSpec
from clemserve.registry.errors import ClemserveError

from . import gguf
from .footprint import weight_files_bytes

#: the folder of a hub id's cached snapshot with its config and weights, or None
SnapshotFinder = Callable[[str], "Path | None"]
#: the files of a hub repository that a load reads, chosen from the names of all its files
FileChoice = Callable[[Sequence[str]], list[str]]
#: files of formats that transformers does not load (other frameworks', GGUF, ONNX, original checkpoints)
_NOT_TRANSFORMERS = (
    ".msgpack",
    ".h5",
    ".ot",
    ".onnx",
    ".onnx_data",
    ".gguf",
    ".tflite",
    ".mlmodel",
    ".ckpt",
    ".pth",
    ".pt",
)


@dataclass(frozen=True)
class Weights:
    """Where an entry's weights are. ``folder``: the folder of its config.json (a local folder or a hub
    snapshot); ``files``: the files that hold them where one file does (GGUF); ``local``: the entry names a
    folder on this machine. Not here: ``missing`` says why, ``download`` that the first load fetches them
    from the hub where the server is online, ``unservable`` that no load can find them (the entry names none).
    ``fetch``: how the server picks the repository's files to download before the load (None: the backend
    downloads what it needs itself, within its load)."""

    source: str
    folder: Path | None = None
    files: tuple[Path, ...] = ()
    local: bool = False
    missing: str = ""
    download: bool = False
    unservable: bool = False
    fetch: FileChoice | None = None

    @property
    def found(self) -> bool:
        return not self.missing

    def bytes_on_disk(self) -> int:
        """The size of a local folder's weight files (the file system alone: it holds for files whose headers
        cannot be read); 0 elsewhere."""
        return weight_files_bytes(self.folder) if self.local and self.folder is not None else 0


def cached_snapshot(repo: str) -> Path | None:
    """The cached snapshot folder of hub id ``repo`` when it holds a config and weights; no network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        config = try_to_load_from_cache(repo, "config.json")
    except ValueError:  # not a valid repo id
        return None
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    patterns = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
    return folder if any(next(folder.glob(pattern), None) for pattern in patterns) else None


def model_config(spec: ModelSpec) -> dict[str, Any]:
    config = spec.get("model_config") or {}
    return config if isinstance(config, dict) else {}


def packaged(config: dict[str, Any]) -> Weights | None:
    """``model_config.gguf``: a GGUF file shipped inside a Python distribution (nothing to download)."""
    source = config.get("gguf")
    if not isinstance(source, dict):
        return None
    distribution, file = str(source.get("distribution")), str(source.get("file"))
    try:
        return Weights(f"{distribution}/{file}", files=(gguf.locate(distribution, file),))
    except ClemserveError as exc:
        return Weights(f"{distribution}/{file}", missing=exc.message)


def transformers_weights(spec: ModelSpec, find: SnapshotFinder = cached_snapshot) -> Weights:
    """A transformers checkpoint: ``model_config.gguf``, else the ``huggingface_id`` folder, else its snapshot
    in the hub's cache."""
    shipped = packaged(model_config(spec))
    if shipped is not None:
        return shipped
    source = str(spec.get("huggingface_id", ""))
    if not source:
        return Weights(source, missing="the registry entry has no huggingface_id", unservable=True)
    if Path(source).is_dir():
        return Weights(source, folder=Path(source), local=True)
    snapshot = find(source)
    if snapshot is not None:
        return Weights(source, folder=snapshot)
    return Weights(
        source,
        missing=f"the server is offline (HF_HUB_OFFLINE) and {source} is not in its Hugging Face cache",
        download=True,
        fetch=transformers_files,
    )


def transformers_files(names: Sequence[str]) -> list[str]:
    """The files of a checkpoint's hub repository that ``from_pretrained`` reads: those at its top (config,
    tokenizer, processor, chat template, remote code, weights), the safetensors weights where there are any
    (not the PyTorch bins beside them, nor Mistral's ``consolidated`` file beside transformers' shards), and
    no weights of other formats."""
    top = [name for name in names if "/" not in name and not name.endswith(_NOT_TRANSFORMERS)]
    safetensors = [name for name in top if name.endswith(".safetensors")]
    chosen = {name for name in safetensors if not name.startswith("consolidated")} or set(safetensors)

    def read(name: str) -> bool:
        if name.endswith(".safetensors"):
            return name in chosen
        return not (chosen and name.endswith((".bin", ".bin.index.json")))

    return [name for name in top if read(name)]
