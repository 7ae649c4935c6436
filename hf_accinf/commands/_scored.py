"""Shared by ``prune``, ``push`` and ``report``: the scored dataset to work on (parsing: :mod:`.parsing`).

The input is a dataset directory (``save_to_disk``) plus, optionally, scoring output directories whose
scores are attached as columns with their provenance (:func:`hf_accinf.data.columns.attach_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data.columns import attach_scores, load_scored_dataset
from ..errors import AccInfError
from ..scoring.artifacts import DATASET_DIR


@dataclass
class ScoredDataArguments:
    """The scored dataset a command reads."""

    dataset: str | None = field(default=None, metadata={"help": "Dataset directory: score's <output_dir>/dataset, a prune "
                                                                "or report output, or any save_to_disk directory. Default: "
                                                                "<first --scores_dir>/dataset."})
    scores_dir: list[str] | None = field(default=None, metadata={"help": "Scoring output directories (scores.safetensors, "
                                                                         "scores.json) to attach as columns with provenance."})

    def load(self):
        if self.dataset is None and not self.scores_dir:
            raise AccInfError("Pass --dataset (a save_to_disk directory) or --scores_dir (a scoring output directory).")
        source = self.dataset or str(Path(self.scores_dir[0]) / DATASET_DIR)
        if self.dataset is None and not Path(source).is_dir():
            raise AccInfError(f"{self.scores_dir[0]} holds no {DATASET_DIR}/ (score_run called from Python writes none; "
                              "hf_accinf.data.columns.write_dataset_column does): pass the training dataset with --dataset.")
        dataset = load_scored_dataset(source)
        for directory in self.scores_dir or []:
            dataset = attach_scores(dataset, directory)
        return dataset
