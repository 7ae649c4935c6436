"""Run under `accelerate launch --multi_gpu --num_processes 2`: records a run and logs, per process,
the rows the dataset really served and the size of every batch the collator built."""

import json
import os
import sys

import torch
from transformers import TrainerCallback, TrainingArguments, default_data_collator

from hf_accinf import AccInfTrainer, RecordingArguments
from hf_accinf.examples import synthetic_text_dataset, tiny_bert


class LoggedDataset(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset, self.served = dataset, []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.served.append(int(index))
        return self.dataset[index]


class ForgetReadsBeforeTraining(TrainerCallback):
    """The recorder reads rows to hash the dataset (on_train_begin); only what the dataloader served counts."""

    def __init__(self, dataset):
        self.dataset, self.cleared = dataset, False

    def on_epoch_begin(self, args, state, control, **kwargs):
        if not self.cleared:
            self.dataset.served, self.cleared = [], True


class LoggedCollator:
    def __init__(self):
        self.sizes = []

    def __call__(self, features):
        self.sizes.append(len(features))
        return default_data_collator(features)


def main(out_dir: str, use_cpu: bool) -> None:
    dataset = LoggedDataset(synthetic_text_dataset(num_rows=50))
    collator = LoggedCollator()
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=2,
        use_cpu=use_cpu, report_to=[], save_strategy="no", disable_tqdm=True, seed=3,
    )
    trainer = AccInfTrainer(
        model=tiny_bert(), args=args, train_dataset=dataset, data_collator=collator,
        recording=RecordingArguments(run_dir=os.path.join(out_dir, "run"), checkpoint_every=4),
        callbacks=[ForgetReadsBeforeTraining(dataset)],
    )
    trainer.train()
    rank = trainer.args.process_index
    with open(os.path.join(out_dir, f"served-{rank}.json"), "w") as handle:
        json.dump({"served": dataset.served, "sizes": collator.sizes, "world_size": trainer.args.world_size}, handle)
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], use_cpu="--no-cpu" not in sys.argv)
