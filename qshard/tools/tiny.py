"""`qshard init-tiny`: randomly initialised model + tokenizer folders, built locally.

No weights can be downloaded here, so demos, tests and benchmarks run on models we build from a
config: a real Hugging Face folder (config.json, model.safetensors, tokenizer files) that goes
through exactly the same loader as a user's checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from qshard.errors import QShardError

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# A Zephyr-like template: every turn opens with its role marker; assistant turns close with <|end|>,
# which is also the eos token, so a model trained on it learns to stop.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ '<|end|>' }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# name -> (hidden, intermediate, layers, heads, kv_heads). "400m" matches the benchmark model of
# DESIGN.md (~400M parameters, Llama-shaped) when combined with a 32k vocabulary.
SIZES = {
    "micro": (64, 128, 2, 4, 2),
    "tiny": (128, 256, 2, 4, 2),
    "small": (256, 688, 4, 8, 4),
    "400m": (1024, 3200, 24, 16, 8),  # 373M parameters with the 32k vocabulary: 747 MB in bf16
}
ARCHS = ("llama", "qwen2", "mistral")

_BUILTIN_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Fine-tuning adapts a pretrained model to a task. "
    "Quantization stores weights in fewer bits. Sharding splits state across devices. "
    "Question: what is two plus two? Answer: four. Paris is the capital of France."
)


def build_tokenizer(texts: Iterable[str] = (), vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts` (plus a small built-in corpus).

    Byte-level means any input text tokenizes without unknown tokens, whatever it was trained on.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_BUILTIN_CORPUS, *texts], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>",
        additional_special_tokens=SPECIAL_TOKENS[2:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, size: str, vocab_size: int):
    """A transformers config of the given architecture and size (random weights follow from it)."""
    from transformers import AutoConfig

    if arch not in ARCHS:
        raise QShardError(f"unknown architecture {arch!r}", where="--arch", fix=f"use one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise QShardError(f"unknown size {size!r}", where="--size", fix=f"use one of {', '.join(SIZES)}")
    hidden, inter, layers, heads, kv = SIZES[size]
    return AutoConfig.for_model(
        arch, vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        max_position_embeddings=2048, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
        # A frozen random head with the usual std 0.02 cannot produce peaked logits at small widths
        # (|logit| <= 0.02 * hidden after the final RMSNorm), so LoRA could not fit anything;
        # 1/sqrt(hidden) gives the head unit-norm rows. Real-size models keep 0.02.
        initializer_range=0.02 if hidden >= 1024 else hidden ** -0.5,
    )


def init_tiny(out_dir: str | Path, arch: str = "llama", size: str = "tiny", seed: int = 0,
              texts: Iterable[str] = (), vocab_size: int | None = None) -> Path:
    """Write a random model + tokenizer folder to `out_dir` and return its path."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise QShardError(f"{out} exists and is not a folder", where=str(out), fix="choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise QShardError(f"{out} is not empty", where=str(out), fix="choose a new folder or delete this one")
    if not 8 <= (vocab_size or 8) <= 1_000_000:
        raise QShardError(f"vocabulary size {vocab_size} is outside 8..1,000,000", where="--vocab-size")
    vocab_size = vocab_size or (32000 if size == "400m" else 512)
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    # the embedding may be larger than the trained vocabulary (e.g. 32k rows for the 400m benchmark model)
    config = tiny_config(arch, size, vocab_size=max(len(tokenizer), vocab_size))
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
