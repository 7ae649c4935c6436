"""Scores back into the ``datasets.Dataset`` as columns, each with its provenance.

One column per scoring run (``influence_<method>`` by default; several coexist). What produced a
column (method, scope, form, run identity, evaluation set, arguments, library version, trust and verify
figures) travels with the dataset in three places: a JSON block in ``DatasetInfo.description`` (survives
``save_to_disk``), the ``hf_accinf`` key of the parquet schema metadata, and the dataset card
(:mod:`hf_accinf.data.hub`). Sign convention (DESIGN.md section 1): a score is the predicted change
of the mean evaluation loss when the row is removed, so > 0 is helpful and < 0 harmful.

Scoring outputs are read by :func:`hf_accinf.scoring.artifacts.load_score_artifact`, the one reader;
this module turns what it read into a column (:func:`attach_scores`) and writes a scoring output's
``dataset/`` (:func:`write_dataset_column`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from ..errors import AccInfError
from ..io import write_directory
from ..scoring.artifacts import DATASET_DIR, ScoreArtifact, load_score_artifact
from ..version import __version__

PARQUET_FILE = "data.parquet"
CARD_FILE = "README.md"
PROVENANCE_KEY = "hf_accinf"
_MARKER = "hf_accinf provenance: "
SIGN_CONVENTION = (
    "score = predicted change of the mean evaluation loss when the row is removed from training: "
    "> 0 helpful (removing the row would raise the evaluation loss), < 0 harmful."
)


def column_provenance(artifact: ScoreArtifact) -> dict:
    """A column's provenance: what its scoring run recorded (absent entries are ``None``)."""
    summary = artifact.summary
    arguments, evaluation = summary.arguments, summary.evaluation
    return {
        "method": summary.method,
        "removal": summary.removal or arguments.get("removal"),
        "schedule": summary.schedule,
        "scope": summary.scope or summary.modules or "recorded chosen parameters",
        "form": summary.form,
        "score_kind": arguments.get("score_kind"),
        "run": {"run_dir": summary.run.run_dir, "manifest_sha256": summary.run.manifest_sha256},
        "evaluation": dataclasses.asdict(evaluation) if evaluation else None,
        "arguments": arguments,
        "trust": summary.trust,
        "verify": summary.verify,
        "lds": summary.lds,
        "replay_max_rel_error": (summary.replay or {}).get("max_rel"),
        "gauge": summary.gauge,
        "scores_dir": str(artifact.path) if artifact.path else None,
        "hf_accinf_version": summary.hf_accinf_version or __version__,
        "sign": SIGN_CONVENTION,
    }


def read_provenance(dataset: Dataset) -> dict:
    """``{"columns": {name: provenance}, ...}`` from a dataset's info (empty when it has none)."""
    text = dataset.info.description or ""
    position = text.rfind(_MARKER)
    if position < 0:
        return {"columns": {}}
    return json.loads(text[position + len(_MARKER):])


def with_provenance(dataset: Dataset, provenance: dict) -> Dataset:
    """``dataset`` with ``provenance`` as its info's JSON block (any user description before it is kept)."""
    text = dataset.info.description or ""
    position = text.rfind(_MARKER)
    user_text = (text[:position] if position >= 0 else text).rstrip()
    info = copy.deepcopy(dataset.info)
    info.description = (user_text + "\n\n" if user_text else "") + _MARKER + json.dumps(provenance, sort_keys=True)
    copied = Dataset(dataset.data, info=info, split=dataset.split, indices_table=dataset._indices)
    form = dataset.format
    return copied.with_format(form["type"], columns=form["columns"], output_all_columns=form["output_all_columns"],
                              **form["format_kwargs"])


def add_score_column(dataset: Dataset, scores, name: str, provenance: dict | None = None) -> Dataset:
    """A copy of ``dataset`` with one float64 column of per-row scores (replacing a column of that name)
    and, when given, the column's ``provenance`` recorded in the dataset's info."""
    scores = scores.detach().cpu().double().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) != len(dataset):
        raise AccInfError(f"{len(scores)} scores for a dataset of {len(dataset)} rows: score the same dataset.")
    known = read_provenance(dataset)
    if name in dataset.column_names:
        dataset = dataset.remove_columns(name)
    dataset = dataset.add_column(name, scores.tolist())
    known["columns"][name] = provenance or {"sign": SIGN_CONVENTION}
    return with_provenance(dataset, known)


def attach_scores(dataset: Dataset, scores: ScoreArtifact | str | os.PathLike, name: str | None = None) -> Dataset:
    """``dataset`` with the scores of one scoring run (a :class:`ScoreArtifact`, e.g. ``score_run(...).artifact()``,
    or its output directory) as a column with its provenance (name default: ``influence_<method>``)."""
    artifact = scores if isinstance(scores, ScoreArtifact) else load_score_artifact(scores)
    return add_score_column(dataset, artifact.scores, name or artifact.column, column_provenance(artifact))


def write_dataset_column(dataset: Dataset, artifact: ScoreArtifact, name: str | None = None) -> Path:
    """Write ``<scoring output>/dataset/``: ``dataset`` with the score column of ``artifact`` (``save_to_disk``),
    replacing a previous one as a whole. The ``score`` command calls it after :func:`~hf_accinf.score_run`."""
    if artifact.path is None:
        raise AccInfError("The scores have no output directory: pass the result of score_run or load_score_artifact.")
    scored = attach_scores(dataset, artifact, name)
    return write_directory(Path(artifact.path) / DATASET_DIR, lambda staging: scored.save_to_disk(str(staging)))


def score_columns(dataset: Dataset) -> list[str]:
    """The dataset's score columns: those with recorded provenance, else those named ``influence_*``."""
    known = read_provenance(dataset)["columns"]
    recorded = [c for c in dataset.column_names if c in known]
    return recorded or [c for c in dataset.column_names if c.startswith("influence_")]


def load_scored_dataset(directory: str | os.PathLike) -> Dataset:
    """A dataset written by :func:`hf_accinf.data.hub.write_scored_dataset` or :func:`write_dataset_column` (its
    ``dataset/``), or any ``save_to_disk`` directory."""
    from datasets import load_from_disk

    path = Path(directory)
    source = path / DATASET_DIR if (path / DATASET_DIR).is_dir() else path
    if not (source / "dataset_info.json").is_file():
        raise AccInfError(f"{path} holds no dataset saved with save_to_disk: pass the directory written by score or prune.")
    return load_from_disk(str(source))
