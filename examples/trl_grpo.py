"""GRPO with TRL and bandadv: band masks, the accidental-success rule with the tracker's prior,
Thompson prompt selection, and bandadv/* metrics in TRL's logs.

    python examples/trl_grpo.py                      # tiny random model on the CPU, < 2 minutes
    python examples/trl_grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --max_steps 200   # a GPU

The task: sums "a+b=" of one-digit numbers; the success reward checks the completion's first
number, a format reward gives a little for a short answer. The tiny model has random weights,
so it mostly shows the machinery (which groups are masked, which prompts are chosen); a real
model learns the task.
"""

from __future__ import annotations

import argparse
import re
import string

ANSWER = re.compile(r"\s*(\d+)")


def correct(completions, answer, **kwargs) -> list[float]:
    """Raw success: the completion starts with the right number."""
    out = []
    for text, expected in zip(completions, answer, strict=True):
        text = text if isinstance(text, str) else text[-1]["content"]
        match = ANSWER.match(text)
        out.append(float(match is not None and int(match.group(1)) == expected))
    return out


def short(completions, **kwargs) -> list[float]:
    """Shaping: up to 0.2 for answers of at most four characters."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [0.2 * min(1.0, 4 / max(len(t.strip()), 1)) for t in texts]


def dataset(num_prompts: int):
    from datasets import Dataset

    pairs = [(a, b) for a in range(10) for b in range(10)][:num_prompts]
    return Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in pairs], "answer": [a + b for a, b in pairs]})


def tiny_model_and_tokenizer(seed: int):
    """A 2-layer Qwen2 of width 64 with random weights and a character-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    chars = string.digits + "+= "
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left", model_max_length=64
    )
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, tie_word_embeddings=True,
    )  # fmt: skip
    return Qwen2ForCausalLM(config), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a Hugging Face model id (default: the tiny random model)")
    parser.add_argument("--output_dir", default="trl_grpo_out")
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--num_prompts", type=int, default=64)
    parser.add_argument("--selection", default="thompson", help="PromptTracker.select strategy, or 'none'")
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()

    from bandadv.integrations.trl import BandGRPOConfig, BandGRPOTrainer

    tiny = cli.model is None
    if tiny:
        model, tokenizer = tiny_model_and_tokenizer(cli.seed)
    else:
        from transformers import AutoTokenizer

        model, tokenizer = cli.model, AutoTokenizer.from_pretrained(cli.model, padding_side="left")
    args = BandGRPOConfig(
        output_dir=cli.output_dir,
        max_steps=cli.max_steps,
        seed=cli.seed,
        learning_rate=1e-3 if tiny else 1e-6,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=1 if tiny else 4,  # a real model: 64 completions, 4 prompts x 16, a step
        num_generations=8 if tiny else 16,
        max_completion_length=4 if tiny else 64,
        use_cpu=tiny,
        bf16=not tiny,
        report_to="none",
        logging_steps=5,
        save_strategy="no",
        # bandadv: rewards = correct + short; success = `correct` alone
        success_reward="correct",
        band=[0.05, 0.95],
        accidental_max_successes=1,  # with a tracker, only prompts already rated hard
        prompt_selection=None if cli.selection == "none" else cli.selection,
    )
    trainer = BandGRPOTrainer(
        model=model,
        reward_funcs=[correct, short],
        args=args,
        train_dataset=dataset(cli.num_prompts),
        processing_class=tokenizer,
    )
    trainer.train()
    for entry in trainer.state.log_history:
        if "bandadv/kept_fraction" in entry:
            print(
                f"step {entry['step']:>4}  reward {entry['reward']:.3f}  kept {entry['bandadv/kept_fraction']:.2f}  "
                f"pass rate {entry['bandadv/mean_pass_rate']:.3f}  all-wrong {entry['bandadv/all_wrong_fraction']:.2f}"
            )


if __name__ == "__main__":
    main()
