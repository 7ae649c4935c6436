"""The files of one scoring run: their names, the typed summary, how the set is written, and the one reader.

``<output_dir>`` holds

    embeddings.safetensors   Delta^j_T per chosen parameter, (N, *shape) (forward form only)
    scores.safetensors       "scores": (N,) predicted change of mean eval loss without row j
    scores.json              the :class:`ScoreSummary`: library version, run identity (with the sha256 of the
                             run's manifest at scoring time), method, scope, form, arguments, evaluation set,
                             trust, verify, lds, replay, projection, files
    query_scores.safetensors "scores": (Q, N) each query row's own scores, "queries": (Q,) evaluation rows
                             (``--verify_subsets`` with queries only)
    dataset/                 the training dataset with the score column, written by the ``score`` command
                             (:func:`hf_accinf.data.columns.write_dataset_column`), not by :func:`score_run`

The set is written as a whole (:func:`hf_accinf.io.write_directory`): an interrupted run never leaves old
and new files mixed. Only names this module owns are ever replaced; a directory holding other files is
refused unless ``overwrite``, and even then its other files are left alone. A rerun into an output of
another run, or with other saved arguments (:data:`RERUN_ARGUMENTS`, the evaluation set), is refused
unless ``overwrite`` (:func:`check_rerun`).

Shards: a long scoring job may write its rows in parts, one file per process or partition
(``scores.part-00001-of-00004.safetensors`` with a ``.done`` marker, :func:`write_scores_shard`), and
complete them later: :func:`pending_shards` says what is left, :func:`aggregate` reads the finished parts
back in row order (or, for parts that split the steps, summed) for :func:`write_set`, which removes the parts
it supersedes. ``.resume/`` holds an interrupted run's resume points (:mod:`hf_accinf.engine.resume`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import io
from ..engine.resume import RESUME_DIR
from ..errors import AccInfError
from ..trajectory.schema import MANIFEST_NAME, load_tensors
from ..version import __version__

EMBEDDINGS_NAME = "embeddings.safetensors"
SCORES_NAME = "scores.safetensors"
SUMMARY_NAME = "scores.json"
PROJECTED_NAME = "projected"  # the one embeddings tensor of projected methods (DVEmb), (N, projection_dim)
DATASET_DIR = "dataset"
QUERY_SCORES_NAME = "query_scores.safetensors"  # --verify_subsets: "scores" (Q, N) per query row, "queries" (Q,)
ARTIFACT_NAMES = (EMBEDDINGS_NAME, SCORES_NAME, SUMMARY_NAME, DATASET_DIR, QUERY_SCORES_NAME)
FORMAT = "hf_accinf.scores"
FORMAT_VERSION = 2  # 2: run.manifest_sha256, evaluation {rows, content_hash, source}, gauge. 1 is still read.
ROWS_KEY = "rows"  # the training row indices a shard holds
RERUN_ARGUMENTS = ("method", "modules", "removal", "dtype", "projection_dim", "projection_seed", "sketch_basis", "form")


def default_output_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "scores"


def manifest_sha256(run_dir: str | os.PathLike) -> str | None:
    """sha256 of the run's ``manifest.json``: names the exact run (``None`` when there is none)."""
    path = Path(run_dir) / MANIFEST_NAME
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


@dataclass
class RunIdentity:
    """Which recorded run was scored: its directory and the sha256 of its manifest when it was scored."""

    run_dir: str
    manifest_sha256: str | None = None
    model_class: str | None = None
    num_steps: int | None = None
    dataset_content_hash: str | None = None
    dataset_length: int | None = None

    @classmethod
    def of(cls, run_dir: str | os.PathLike, manifest) -> "RunIdentity":
        """The identity of the run in ``run_dir`` (whose manifest is ``manifest``), taken now."""
        identity = manifest.identity()
        return cls(str(run_dir), manifest_sha256(run_dir), identity["model_class"], manifest.num_steps,
                   identity["dataset"]["content_hash"], identity["dataset"]["length"])


@dataclass
class EvaluationSet:
    """The evaluation rows the scores are measured on: how many, a hash of their content, where they came from."""

    rows: int | None = None
    content_hash: str | None = None  # trajectory.schema.content_hash of the rows (None: not hashable)
    source: str | None = None  # e.g. the run's recorded held-out split, or the --eval_data directory

    def describe(self) -> str:
        parts = [self.source or "source not recorded"]
        if self.rows is not None:
            parts.append(f"{self.rows} rows")
        if self.content_hash:
            parts.append(f"content sha256 {self.content_hash[:12]}")
        return ", ".join(parts)


@dataclass
class ScoreSummary:
    """``scores.json``: everything known about how a set of scores was made."""

    run: RunIdentity
    method: str
    column: str
    arguments: dict = field(default_factory=dict)  # ScoreArguments.to_dict() as the run used them (method resolved)
    scope: list[str] = field(default_factory=list)
    form: str | None = None
    removal: str | None = None
    dtype: str | None = None  # the propagation's (ScoreArguments.dtype resolved)
    modules: list[str] | None = None
    backend: str | None = None
    schedule: str | None = None
    evaluation: EvaluationSet | None = None
    trust: dict | None = None  # engine.trust.TrustReport.to_dict()
    verify: dict | None = None  # --verify: agreement with rows retrained out by replay
    lds: dict | None = None  # --verify_subsets: LDS over random subsets retrained out by replay (scoring.lds)
    replay: dict | None = None  # trajectory.replay.ReplayReport.to_dict()
    projection: dict | None = None  # methods.projection.projection_fingerprint() of projected methods
    gauge: list = field(default_factory=list)  # gauge tensors left out of the scope (DESIGN.md section 6b)
    plan: dict | None = None  # scoring.plan.ScoringPlan.to_dict(): each auto decision and why, the fallback
    seconds: float | None = None
    cost_model: dict | None = None
    most_harmful: list[int] = field(default_factory=list)
    most_helpful: list[int] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    hf_accinf_version: str = __version__
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)  # entries this version does not know, kept as read

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self._fields() if name != "extra"}
        data["run"] = dataclasses.asdict(self.run)
        data["evaluation"] = dataclasses.asdict(self.evaluation) if self.evaluation else None
        return {"format": FORMAT, **self.extra, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "scores.json") -> "ScoreSummary":
        """Read a summary of format version 1 or 2; entries it does not know are kept in ``extra``."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise AccInfError(f"{where} was not written by hf-accinf score: score the run again.")
        version = data.get("format_version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise AccInfError(f"{where} has format version {version}, newer than this hf_accinf reads "
                              f"({FORMAT_VERSION}): upgrade hf_accinf (pip install -U hf_accinf).")
        data = dict(data)
        data.pop("format")
        known = {name: data.pop(name) for name in cls._fields() if name in data}
        run = known.pop("run", None) or {}
        evaluation = known.pop("evaluation", None)
        if version == 1 and "evaluation_rows" in data:  # version 1 recorded the row count only
            evaluation = {"rows": data.pop("evaluation_rows")}
        try:
            return cls(run=RunIdentity(**{k: v for k, v in run.items() if k in _names(RunIdentity)}),
                       evaluation=EvaluationSet(**evaluation) if isinstance(evaluation, dict) else None,
                       **{**known, "method": known.get("method") or known.get("arguments", {}).get("method") or "unknown",
                          "column": known.get("column") or column_name(known.get("method") or "unknown"),
                          "format_version": version, "extra": {**known.get("extra", {}), **data}})
        except TypeError as error:
            raise AccInfError(f"{where} is damaged ({error}): score the run again.") from None

    @classmethod
    def _fields(cls) -> list[str]:
        return _names(cls)

    def rerun_key(self) -> dict[str, Any]:
        """What a rerun into this output must share with it (:func:`check_rerun`)."""
        return rerun_key(self.run.manifest_sha256, self.arguments, self.evaluation)


def _names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def column_name(method: str) -> str:
    """The score column of a method's scores: ``influence_<method>`` (dashes as underscores)."""
    return "influence_" + method.replace("-", "_")


def rerun_key(manifest_hash: str | None, arguments: dict, evaluation: EvaluationSet | None) -> dict[str, Any]:
    """The run, the arguments of :data:`RERUN_ARGUMENTS` and the evaluation rows that identify a set of scores."""
    return {"run manifest sha256": manifest_hash, **{name: arguments.get(name) for name in RERUN_ARGUMENTS},
            "evaluation rows": evaluation.rows if evaluation else None,
            "evaluation rows' sha256": evaluation.content_hash if evaluation else None}


_NOT_IN_VERSION_1 = ("run manifest sha256", "evaluation rows' sha256")  # entries a version 1 summary lacks


@dataclass
class ScoreArtifact:
    """One scoring output read back: the per-row scores and their summary."""

    scores: torch.Tensor
    summary: ScoreSummary
    path: Path | None = None

    @property
    def method(self) -> str:
        return self.summary.method

    @property
    def column(self) -> str:
        return self.summary.column


def _owned_names(output_dir: Path) -> set[str] | None:
    """Names a previous scoring run owns in ``output_dir`` (``None``: not a scoring output)."""
    summary = output_dir / SUMMARY_NAME
    if not summary.is_file():
        return None
    try:
        data = json.loads(summary.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    return set(data.get("files", [])) | {SUMMARY_NAME, DATASET_DIR} | _shards(output_dir)


def _shards(output_dir: Path) -> set[str]:
    """The names of work in progress: shards, their markers, and the resume points."""
    if not output_dir.is_dir():
        return set()
    return {p.name for p in output_dir.iterdir() if io.is_shard(p.name, SCORES_NAME) or p.name == RESUME_DIR}


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output directory that cannot take the set, before any work."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise AccInfError(f"The output directory {output_dir} is a file: pass a directory (--output_dir).")
    foreign = output_dir.is_dir() and set(p.name for p in output_dir.iterdir()) - _shards(output_dir)
    if foreign and _owned_names(output_dir) is None and not overwrite:
        raise AccInfError(
            f"The output directory {output_dir} is not empty and was not written by hf-accinf score. Choose another "
            "--output_dir, or pass --overwrite to write the score files there (other files are left alone)."
        )
    for parent in output_dir.parents:
        if parent.exists():
            if not os.access(parent, os.W_OK):
                raise AccInfError(f"Cannot write under {parent}: choose a writable --output_dir.")
            break
    return output_dir


def check_rerun(output_dir: str | os.PathLike, request: dict[str, Any], overwrite: bool = False) -> None:
    """Refuse to replace the scores of another run, or of other arguments, unless ``overwrite``.

    ``request``: :func:`rerun_key` of the new scores. Entries a version 1 summary did not record (the
    manifest hash, the evaluation rows' hash) are not compared."""
    output_dir = Path(output_dir)
    if overwrite or not scores_exist(output_dir):
        return
    saved = read_summary(output_dir).rerun_key()
    differ = [name for name, value in request.items()
              if saved.get(name) != value and not (name in _NOT_IN_VERSION_1 and saved.get(name) is None)]
    if differ:
        changes = "; ".join(f"{name} {saved.get(name)!r} there, {request[name]!r} now" for name in differ)
        raise AccInfError(f"{output_dir} holds scores of another run or other arguments ({changes}). Pass --overwrite "
                          "to replace them, or choose another --output_dir.")


def write_set(output_dir: str | os.PathLike, writers: dict[str, Callable[[Path], None]], summary: ScoreSummary,
              overwrite: bool = False) -> ScoreSummary:
    """Write ``writers[name](path)`` for each artifact plus the summary, then move the set into place (the
    summary last); the names of a previous set that this one does not have, and its shards, are removed.
    Returns the summary as written (its ``files`` filled in)."""
    output_dir = check_output_dir(output_dir, overwrite)
    summary = dataclasses.replace(summary, files=sorted(writers))
    owned = (_owned_names(output_dir) or set()) | _shards(output_dir)
    existing = {path.name for path in output_dir.iterdir()} if output_dir.is_dir() else set()

    def fill(staging: Path) -> None:
        for name, write in writers.items():
            write(staging / name)
        (staging / SUMMARY_NAME).write_text(json.dumps(summary.to_dict(), indent=2))

    # Nothing but a previous set (or nothing): one rename. Else the user's files stay, ours are replaced.
    io.write_directory(output_dir, fill, replaces=None if existing <= owned else owned, last=SUMMARY_NAME)
    return summary


def scores_exist(output_dir: str | os.PathLike) -> bool:
    return _owned_names(Path(output_dir)) is not None


def read_summary(output_dir: str | os.PathLike) -> ScoreSummary:
    output_dir = Path(output_dir)
    if not scores_exist(output_dir):
        raise AccInfError(f"No scores at {output_dir}: run `hf-accinf score` first (or pass its --output_dir).")
    return ScoreSummary.from_dict(json.loads((output_dir / SUMMARY_NAME).read_text()), str(output_dir / SUMMARY_NAME))


def load_score_artifact(output_dir: str | os.PathLike) -> ScoreArtifact:
    """The one reader of a scoring output: ``scores.json`` and the ``scores`` tensor of ``scores.safetensors``."""
    output_dir = Path(output_dir)
    summary = read_summary(output_dir)
    path = output_dir / SCORES_NAME
    if not path.is_file():
        raise AccInfError(f"No {SCORES_NAME} in {output_dir}: score the run again (--overwrite).")
    scores = load_tensors(path).get("scores")
    if scores is None or scores.ndim != 1:
        raise AccInfError(f"{path} holds no one-dimensional 'scores' tensor: score the run again.")
    return ScoreArtifact(scores, summary, output_dir)


def load_scores(output_dir: str | os.PathLike) -> torch.Tensor:
    """The ``(N,)`` scores of :func:`load_score_artifact`."""
    return load_score_artifact(output_dir).scores


def load_embeddings(output_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    read_summary(output_dir)
    return load_tensors(Path(output_dir) / EMBEDDINGS_NAME)


def write_scores_shard(output_dir: str | os.PathLike, index: int, count: int, rows: torch.Tensor, scores: torch.Tensor,
                       embeddings: dict[str, torch.Tensor] | None = None, marker: dict | None = None) -> Path:
    """Write the scores (and embeddings) of training rows ``rows`` as shard ``index`` of ``count``, with its
    completion marker (holding ``marker`` too). The shards are completed later by :func:`aggregate` and
    :func:`write_set`."""
    from safetensors.torch import save_file

    rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
    if scores.shape != rows.shape or any(len(value) != len(rows) for value in (embeddings or {}).values()):
        raise AccInfError(f"Shard {index}: {len(rows)} rows but scores {tuple(scores.shape)} and embeddings "
                          f"{[tuple(v.shape) for v in (embeddings or {}).values()]}: give one value per row.")
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        check_output_dir(output_dir)
    tensors = {ROWS_KEY: rows.contiguous(), "scores": scores.detach().cpu().contiguous(),
               **{f"embeddings.{name}": value.detach().cpu().contiguous() for name, value in (embeddings or {}).items()}}
    return io.write_shard(output_dir, SCORES_NAME, index, count, lambda tmp: save_file(tensors, tmp),
                          marker={**(marker or {}), "rows": len(rows)})


def pending_shards(output_dir: str | os.PathLike, count: int) -> list[int]:
    """The shards of ``count`` not finished yet (written without their marker, or not at all)."""
    return io.shard_status(output_dir, SCORES_NAME, count)[1]


def aggregate(output_dir: str | os.PathLike, count: int, num_rows: int,
              combine: str = "rows") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(scores (N,), embeddings {name: (N, ...)})`` in row order from the ``count`` finished shards, which must
    cover the rows ``0 .. num_rows - 1`` exactly once (``combine="rows"``), or each every row, their values
    summed (``combine="sum"``: shards that split the steps)."""
    finished, missing = io.shard_status(output_dir, SCORES_NAME, count)
    if missing:
        raise AccInfError(f"Shards {missing} of {count} in {output_dir} are not finished: score them (resume) before "
                          "completing the output.")
    parts = [load_tensors(finished[index]) for index in range(count)]
    rows = torch.cat([part[ROWS_KEY] for part in parts])
    covered = torch.zeros(num_rows, dtype=torch.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= num_rows):
        raise AccInfError(f"The shards in {output_dir} hold rows outside 0..{num_rows - 1}: they belong to another run.")
    covered.index_add_(0, rows, torch.ones_like(rows))
    if combine == "sum":
        if not torch.all(covered == count):
            raise AccInfError(f"The shards in {output_dir} split the steps, but not each holds every one of the "
                              f"{num_rows} rows: score them again.")
        totals: dict[str, torch.Tensor] = {}
        for part in parts:
            order = torch.argsort(part[ROWS_KEY])
            for name, value in part.items():
                if name != ROWS_KEY:
                    totals[name] = totals[name] + value[order] if name in totals else value[order].clone()
        scores = totals.pop("scores")
        return scores, {name.removeprefix("embeddings."): value for name, value in totals.items()}
    if not torch.all(covered == 1):
        twice, never = (covered > 1).nonzero().flatten()[:5].tolist(), (covered == 0).nonzero().flatten()[:5].tolist()
        raise AccInfError(f"The shards in {output_dir} do not cover the {num_rows} rows once each (rows held twice "
                          f"{twice}, never {never}, first five): score the shards again with one partition.")
    order = torch.argsort(rows)
    names = [name for name in parts[0] if name != ROWS_KEY]
    merged = {name: torch.cat([part[name] for part in parts])[order] for name in names}
    scores = merged.pop("scores")
    return scores, {name.removeprefix("embeddings."): value for name, value in merged.items()}
