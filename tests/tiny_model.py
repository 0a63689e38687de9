"""A tiny random-weight Llama with a trained tokenizer, built offline in about a second.

Deterministic: the same seed gives the same weights, so greedy outputs repeat across runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
EOS_TO_CULL = "</s>"

_CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Hello! How can I help you? Tell me the name of the capital of Australia.",
    "You are playing a game. Guess the word. My guess is: apple. Your answer was correct.",
    "The quick brown fox jumps over the lazy dog. Numbers 0 1 2 3 4 5 6 7 8 9.",
    "user assistant system turn response prompt model server client batch token context",
]


def bpe_tokenizer(corpus: list[str], specials: list[str], **named: Any) -> Any:
    """A byte-level BPE tokenizer of 400 tokens trained offline on ``corpus`` (``named``: its special tokens by
    role, as PreTrainedTokenizerFast takes them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **named)


def build_tiny_llama(
    folder: Path,
    *,
    seed: int = 0,
    max_positions: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 2,
    tied: bool = False,
) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    specials = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    fast = bpe_tokenizer(_CORPUS, specials, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


#: bytes per element of the safetensors dtypes the fakes use
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1}


def write_sparse_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A valid safetensors file of any size that holds no disk: its header, then a hole as long as the
    tensors' data (a file system with sparse files allocates none of it)."""
    import json

    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = _DTYPE_BYTES[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(len(text).to_bytes(8, "little") + text)
        out.truncate(8 + len(text) + offset)
