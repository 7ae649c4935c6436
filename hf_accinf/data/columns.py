"""Scores back into the ``datasets.Dataset`` as columns, each with its provenance.

One column per scoring run (``influence_<method>`` by default; several coexist). What produced a
column (method, scope, form, run identity, evaluation set, arguments, library version, trust figures)
travels with the dataset in three places: a JSON block in ``DatasetInfo.description`` (survives
``save_to_disk``), the ``hf_accinf`` key of the parquet schema metadata, and the dataset card
(:mod:`hf_accinf.data.hub`). Sign convention (DESIGN.md section 1): a score is the predicted change
of the mean evaluation loss when the row is removed, so > 0 is helpful and < 0 harmful.

:func:`load_scores` is the one reader of a scoring output directory (``scores.safetensors`` and
``scores.json``); it ignores metadata it does not know.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from ..errors import AccInfError

SCORES_FILE = "scores.safetensors"
SUMMARY_FILE = "scores.json"
MANIFEST_FILE = "manifest.json"
DATASET_DIR = "dataset"
PARQUET_FILE = "data.parquet"
CARD_FILE = "README.md"
PROVENANCE_KEY = "hf_accinf"
_MARKER = "hf_accinf provenance: "
SIGN_CONVENTION = (
    "score = predicted change of the mean evaluation loss when the row is removed from training: "
    "> 0 helpful (removing the row would raise the evaluation loss), < 0 harmful."
)


@dataclass
class ScoreArtifact:
    """One scoring run read back: the per-row scores and everything known about how they were made."""

    scores: np.ndarray
    summary: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def method(self) -> str:
        return str(self.summary.get("arguments", {}).get("method") or self.summary.get("method") or "unknown")

    @property
    def column(self) -> str:
        return self.summary.get("column") or column_name(self.method)

    def provenance(self) -> dict:
        """The column's provenance, from what the scoring run recorded (absent entries are ``None``)."""
        summary, arguments = self.summary, self.summary.get("arguments", {})
        run_dir = arguments.get("run_dir") or summary.get("run_dir")
        return {
            "method": self.method,
            "removal": arguments.get("removal"),
            "schedule": summary.get("schedule"),
            "scope": summary.get("scope") or summary.get("modules") or arguments.get("modules") or "recorded chosen parameters",
            "form": summary.get("form"),
            "score_kind": arguments.get("score_kind"),
            "run": {"run_dir": run_dir, "manifest_sha256": manifest_hash(run_dir)},
            "evaluation": summary.get("evaluation") or arguments.get("eval_data") or "not recorded by the scoring run",
            "arguments": arguments,
            "trust": summary.get("trust"),
            "verify": {k: v for k, v in (summary.get("verify") or {}).items() if k not in ("estimate", "truth", "truth_half")}
            or None,
            "replay_max_rel_error": (summary.get("replay") or {}).get("max_rel"),
            "scores_dir": str(self.path) if self.path else None,
            "hf_accinf_version": summary.get("hf_accinf_version") or _version(),
            "sign": SIGN_CONVENTION,
        }


def _version() -> str:
    from .. import __version__

    return __version__


def column_name(method: str) -> str:
    return "influence_" + method.replace("-", "_")


def manifest_hash(run_dir: str | os.PathLike | None) -> str | None:
    """sha256 of the run's ``manifest.json``: names the exact run a column was computed from."""
    if not run_dir or not Path(run_dir, MANIFEST_FILE).is_file():
        return None
    return hashlib.sha256(Path(run_dir, MANIFEST_FILE).read_bytes()).hexdigest()


def load_scores(scores_dir: str | os.PathLike) -> ScoreArtifact:
    """Read ``<scores_dir>/scores.safetensors`` (key ``scores``) and ``scores.json`` when present."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(scores_dir)
    path = directory / SCORES_FILE
    if not path.is_file():
        raise AccInfError(f"No {SCORES_FILE} in {directory}: run `hf-accinf score` first, or pass its --output_dir.")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        raise AccInfError(f"{path} cannot be read ({error}): score the run again.") from error
    if "scores" not in tensors or tensors["scores"].ndim != 1:
        raise AccInfError(f"{path} holds no one-dimensional 'scores' tensor: score the run again.")
    summary = {}
    if (directory / SUMMARY_FILE).is_file():
        try:
            summary = json.loads((directory / SUMMARY_FILE).read_text())
        except json.JSONDecodeError as error:
            raise AccInfError(f"{directory / SUMMARY_FILE} is not valid JSON ({error}): score the run again.") from error
    return ScoreArtifact(tensors["scores"].double().numpy(), summary, directory)


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


def attach_scores(dataset: Dataset, scores_dir: str | os.PathLike, name: str | None = None) -> Dataset:
    """Add the scores of one scoring run as a column with its provenance (name default: ``influence_<method>``)."""
    artifact = load_scores(scores_dir)
    return add_score_column(dataset, artifact.scores, name or artifact.column, artifact.provenance())


def score_columns(dataset: Dataset) -> list[str]:
    """The dataset's score columns: those with recorded provenance, else those named ``influence_*``."""
    known = read_provenance(dataset)["columns"]
    recorded = [c for c in dataset.column_names if c in known]
    return recorded or [c for c in dataset.column_names if c.startswith("influence_")]


def write_scored_dataset(dataset: Dataset, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``dataset/`` (``save_to_disk``), ``data.parquet`` (provenance in its schema metadata) and the
    card ``README.md`` into ``directory``, as a whole: a staging directory, then one rename."""
    import pyarrow.parquet as pq

    from .hub import dataset_card

    target = Path(directory)
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise AccInfError(f"{target} exists and is not empty: choose another directory or pass --overwrite.")
        if not (target / DATASET_DIR).is_dir() or not (target / CARD_FILE).is_file():
            raise AccInfError(f"{target} was not written by hf_accinf: refusing to replace it; choose another directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        dataset.save_to_disk(str(staging / DATASET_DIR))
        table = dataset.with_format("arrow")[:]
        metadata = dict(table.schema.metadata or {})
        metadata[PROVENANCE_KEY.encode()] = json.dumps(read_provenance(dataset), sort_keys=True).encode()
        pq.write_table(table.replace_schema_metadata(metadata), staging / PARQUET_FILE)
        (staging / CARD_FILE).write_text(dataset_card(dataset))
        os.chmod(staging, 0o777 & ~_umask())
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_scored_dataset(directory: str | os.PathLike) -> Dataset:
    """A dataset written by :func:`write_scored_dataset` (its ``dataset/``), or any ``save_to_disk`` directory."""
    from datasets import load_from_disk

    path = Path(directory)
    source = path / DATASET_DIR if (path / DATASET_DIR).is_dir() else path
    if not (source / "dataset_info.json").is_file():
        raise AccInfError(f"{path} holds no dataset saved with save_to_disk: pass the directory written by score or prune.")
    return load_from_disk(str(source))
