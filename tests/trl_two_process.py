"""Run by test_trl.test_two_processes under torchrun (two CPU processes, gloo): trains
BandGRPOTrainer with a band and Thompson selection, and saves, per rank, the tracker's hash after
every step and each generation batch's gathered rewards and local advantages."""

from __future__ import annotations

import sys

import torch
from transformers import AutoTokenizer, TrainerCallback

from bandadv.integrations.trl import BandGRPOConfig, BandGRPOTrainer
from trl_helpers import base_args, coin_success, state_hash, tiny_dataset, vowel_reward


class RecordingTrainer(BandGRPOTrainer):
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        last = self._bandadv_last
        self.batches.append(
            {
                "rewards": last["rewards"].cpu(),
                "success": last["success"].cpu(),
                "group_ids": last["group_ids"].cpu(),
                "advantages": output["advantages"].cpu(),
                "config": self.args.advantage_config("grpo", self.scale_rewards),
            }
        )
        return output


class HashCallback(TrainerCallback):
    def __init__(self) -> None:
        self.trainer = None
        self.hashes: list[str] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.hashes.append(state_hash(self.trainer._bandadv_tracker))


def main(model_dir: str, out_dir: str) -> None:
    callback = HashCallback()
    args = base_args(
        out_dir, max_steps=4, band=[0.2, 0.8], success_reward="coin_success", prompt_selection="thompson",
        ddp_backend="gloo",
    )  # fmt: skip
    trainer = RecordingTrainer(
        model=model_dir,
        reward_funcs=[vowel_reward, coin_success],
        args=BandGRPOConfig(**args),
        train_dataset=tiny_dataset(),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=[callback],
    )
    trainer.batches = []
    callback.trainer = trainer
    assert trainer.accelerator.num_processes == 2, trainer.accelerator.num_processes
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save(
        {
            "hashes": callback.hashes,
            "batches": trainer.batches,
            "selected": [entry["rows"] for entry in trainer._bandadv_sampler.selection_log],
            "log_has_bandadv": any("bandadv/kept_fraction" in h for h in trainer.state.log_history),
        },
        f"{out_dir}/rank{rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
