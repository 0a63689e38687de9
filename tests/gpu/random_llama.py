"""Random-weight Llama models of a chosen size and dtype, built offline, for the GPU tests and bench/gpu.py.

The tokenizer is the tiny model's (tests/tiny_model.py, 400 tokens); the transformer is as large as asked:
``0.5b`` is a Llama of about 0.5 billion parameters (most of them in its 20 layers), ``tiny`` the tiny
model's shape for quick runs on a CPU. Weights are saved in ``dtype`` and recorded as the checkpoint's
``dtype``, so ``dtype="auto"`` (how huggingface_local loads) loads them so.

:func:`random_llama` keeps the models it builds in a folder, so that ``make gpu-check``'s tests and benchmark
build each once (a 0.5b float32 model takes seconds to build and 2 GB to store).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.tiny_model import build_tiny_llama


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    max_positions: int


SHAPES = {
    "tiny": Shape(hidden=64, intermediate=128, layers=2, heads=2, kv_heads=2, max_positions=512),
    "small": Shape(hidden=256, intermediate=688, layers=4, heads=4, kv_heads=2, max_positions=1024),
    "0.5b": Shape(hidden=1536, intermediate=4096, layers=20, heads=12, kv_heads=4, max_positions=4096),
}


def build_random_llama(folder: Path, size: str = "0.5b", dtype: str = "bfloat16", seed: int = 0) -> Path:
    """A random Llama of ``SHAPES[size]`` saved in ``dtype`` (``float32``, ``bfloat16``, ``float16``)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shape = SHAPES[size]
    build_tiny_llama(folder, seed=seed)  # the tokenizer (and a tiny model, replaced below)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    for stale in folder.glob("*.safetensors*"):
        stale.unlink()
    model.save_pretrained(folder)
    return folder


def random_llama(models: Path, size: str = "0.5b", dtype: str = "bfloat16", seed: int = 0) -> Path:
    """:func:`build_random_llama`'s model, built in ``models`` once and reused while what built it is the same.

    The folder's name holds a digest of the shape, the seed, transformers' version and the source of the two
    builders, so a changed builder builds a new model rather than reusing a stale one.
    """
    import transformers

    here = Path(__file__).resolve()
    digest = hashlib.sha256(repr((asdict(SHAPES[size]), seed, transformers.__version__)).encode())
    for source in (here, here.parent.parent / "tiny_model.py"):
        digest.update(source.read_bytes())
    folder = models / f"{size}-{dtype}-{digest.hexdigest()[:12]}"
    if not (folder / "config.json").is_file():
        building = models / f".{folder.name}.{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        try:
            build_random_llama(building, size, dtype, seed)
            building.rename(folder)
        except OSError:  # another process built it first
            if not (folder / "config.json").is_file():
                raise
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return folder


def parameter_count(size: str, vocab: int = 400) -> int:
    """The parameters of a ``size`` model, counted from its shape."""
    s = SHAPES[size]
    head = s.hidden // s.heads
    attention = 2 * s.hidden * s.hidden + 2 * s.hidden * s.kv_heads * head
    layer = attention + 3 * s.hidden * s.intermediate + 2 * s.hidden
    return s.layers * layer + 2 * vocab * s.hidden + s.hidden
