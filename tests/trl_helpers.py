"""A tiny offline TRL setup: a 2-layer Qwen2 of width 64 with random weights, a character-level
tokenizer, an in-memory dataset and rewards with spread. Nothing is downloaded."""

from __future__ import annotations

import hashlib
import string

import torch

CHARS = string.ascii_lowercase + string.digits + " +=?"


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left", model_max_length=64
    )


def tiny_model(tokenizer, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=True,
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


def tiny_dataset(n: int = 16):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"{i % 10}+{i // 10}=" for i in range(n)], "level": [i % 4 for i in range(n)]})


def vowel_reward(completions, **kwargs) -> list[float]:
    """Share of vowels in the completion: spread within every group."""
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]


def coin_success(completions, level, **kwargs) -> list[float]:
    """0/1 success that depends on the prompt (level 0 prompts always succeed) and the text."""
    return [
        1.0 if lv == 0 else float(sum(map(ord, text)) % (lv + 1) == 0)
        for text, lv in zip(completions, level, strict=True)
    ]


def base_args(output_dir, **overrides) -> dict:
    args = dict(
        output_dir=str(output_dir), use_cpu=True, bf16=False, report_to="none", seed=0, learning_rate=1e-2,
        per_device_train_batch_size=8, gradient_accumulation_steps=1, num_generations=4,
        max_completion_length=8, max_steps=3, logging_steps=1, save_strategy="no", temperature=1.0,
        dataloader_num_workers=0,
    )  # fmt: skip
    args.update(overrides)
    return args


def state_hash(tracker) -> str:
    h = hashlib.sha256()
    for name in sorted(tracker.state):
        h.update(name.encode())
        h.update(tracker.state[name].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_tiny_model(path) -> str:
    """Saves the tiny model and tokenizer to `path` (so that RLOO can load its reference model)."""
    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)
