"""Tiny random-weight vision-language models with trained tokenizers, built offline in a few seconds.

Two families of clembench's multimodal registry entries, each saved with its processor as the hub holds them:

- LLaVA: ``LlavaForConditionalGeneration`` (a CLIP vision tower, a projector, a Llama), ``LlavaProcessor``
  (``CLIPImageProcessor`` + the tokenizer); ``AutoModelForCausalLM`` does not know it.
- Gemma 3: ``Gemma3ForConditionalGeneration`` (a SigLIP vision tower, pooling, a Gemma 3 text model),
  ``Gemma3Processor``; ``AutoModelForCausalLM`` loads it.

Deterministic: the same seed gives the same weights, so greedy outputs repeat across runs and processes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from tests.tiny_model import bpe_tokenizer

#: renders clembench's HF message form: content as a list of {"type": "image"} and {"type": "text"} parts
LLAVA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% for part in m['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
    "{% for part in m['content'] %}{% if part['type'] == 'image' %}<start_of_image>{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_CORPUS = [
    "What is in this picture? A red square on a blue background. Which image shows the cloud?",
    "Hello! How can I help you? Describe the image. The first image and the second image differ.",
    "You are playing a game. Guess the word. My guess is: apple. Your answer was correct. yes no",
    "The quick brown fox jumps over the lazy dog. Numbers 0 1 2 3 4 5 6 7 8 9. left right up down",
]


def build_tiny_llava(folder: Path, *, seed: int = 0, max_positions: int = 512) -> Path:
    """LLaVA with a 30x30-pixel CLIP tower (2x2 patches of 15): 4 image tokens per image."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = bpe_tokenizer(
        _CORPUS,
        ["<s>", "</s>", "<image>", "<|system|>", "<|user|>", "<|assistant|>"],
        bos_token="<s>",
        eos_token="</s>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}, do_center_crop=True
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=15,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
        image_token="<image>",
    )
    torch.manual_seed(seed)
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=30, patch_size=15
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_gemma3(folder: Path, *, seed: int = 0, max_positions: int = 512) -> Path:
    """Gemma 3 with a 32x32-pixel SigLIP tower (4x4 patches of 8) pooled to 4 image tokens per image."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    image_tokens = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
    tokenizer = bpe_tokenizer(
        _CORPUS,
        ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", *image_tokens.values()],
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        extra_special_tokens=image_tokens,
    )
    image_processor = Gemma3ImageProcessor(size={"height": 32, "width": 32})
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=GEMMA3_TEMPLATE, image_seq_length=4
    )
    torch.manual_seed(seed)
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=max_positions,
        sliding_window=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
    )
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # Gemma's own initialisation makes a tiny model answer the same token whatever it sees
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


BUILDERS = {"llava": build_tiny_llava, "gemma3": build_tiny_gemma3}


def tiny_vlm(kind: str, cache: Path) -> Path:
    """The tiny model of ``kind`` in ``cache``, built once (a marker file says the build finished)."""
    import os
    import shutil

    folder = cache / f"tiny-{kind}-v2"
    if not folder.is_dir():
        building = cache / f".{folder.name}-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        BUILDERS[kind](building)
        try:
            building.rename(folder)  # whole or not at all, whichever run builds it first
        except OSError:
            shutil.rmtree(building, ignore_errors=True)
    return folder


def vlm_cache() -> Path:
    """Where the tests keep the tiny models (built once per transformers version)."""
    import transformers

    from tests.serving import DEMO_CACHE

    return DEMO_CACHE / "tiny-vlm" / transformers.__version__


def draw_png(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A small PNG of coloured rectangles, different for each seed."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.randrange(size[0] // 2), rng.randrange(size[1] // 2)
        box = (x0, y0, x0 + rng.randrange(4, size[0] // 2), y0 + rng.randrange(4, size[1] // 2))
        draw.rectangle(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def registry_entry(name: str, folder: Path, **config: Any) -> dict[str, Any]:
    """A clembench huggingface_local entry with ``multimodal: true`` for the model in ``folder``."""
    return {
        "model_name": name,
        "backend": "huggingface_local",
        "huggingface_id": str(folder),
        "model_config": {"multimodal": True, "premade_chat_template": True, "eos_to_cull": "", **config},
    }


if __name__ == "__main__":  # python -m tests.tiny_vlm FOLDER: build both, print their files
    import sys

    for kind in BUILDERS:
        path = tiny_vlm(kind, Path(sys.argv[1]))
        print(kind, json.dumps(sorted(p.name for p in path.iterdir())))
