"""The files of one scoring run, their names and metadata, and how the set is written and read.

``<output_dir>`` holds

    embeddings.safetensors   Delta^j_T per chosen parameter, (N, *shape)
    scores.safetensors       "scores": (N,) predicted change of mean eval loss without row j
    scores.json              metadata: library version, run identity, method, modules, arguments, files
    dataset/                 the training dataset with the score column (datasets.Dataset only)

The set is written as a whole: into a staging directory beside ``output_dir``, then renamed into
place, so an interrupted run never leaves old and new files mixed. Only files this module wrote
(listed in ``scores.json``) are ever replaced; a directory holding other files is refused unless
``overwrite``, and even then its other files are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import AccInfError
from ..trajectory.schema import current_umask, load_tensors

EMBEDDINGS_NAME = "embeddings.safetensors"
SCORES_NAME = "scores.safetensors"
SUMMARY_NAME = "scores.json"
DATASET_DIR = "dataset"
ARTIFACT_NAMES = (EMBEDDINGS_NAME, SCORES_NAME, SUMMARY_NAME, DATASET_DIR)
FORMAT = "hf_accinf.scores"
FORMAT_VERSION = 1


def default_output_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "scores"


def _owned_names(output_dir: Path) -> set[str] | None:
    """Names a previous scoring run wrote into ``output_dir`` (``None``: not a scoring output)."""
    summary = output_dir / SUMMARY_NAME
    if not summary.is_file():
        return None
    try:
        data = json.loads(summary.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    return set(data.get("files", [])) | {SUMMARY_NAME}


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output directory that cannot take the set, before any work."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise AccInfError(f"The output directory {output_dir} is a file: pass a directory (--output_dir).")
    if output_dir.is_dir() and any(output_dir.iterdir()) and _owned_names(output_dir) is None and not overwrite:
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


def write_set(output_dir: str | os.PathLike, writers: dict[str, Callable[[Path], None]], summary: dict[str, Any],
              overwrite: bool = False) -> Path:
    """Write ``writers[name](path)`` for each artifact plus the summary, then move the set into place."""
    output_dir = check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.staging-"))
    try:
        os.chmod(staging, 0o777 & ~current_umask())
        for name, write in writers.items():
            write(staging / name)
        summary = {"format": FORMAT, "format_version": FORMAT_VERSION, **summary, "files": sorted(writers)}
        (staging / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
        for path in staging.iterdir():
            if path.is_file():
                os.chmod(path, 0o666 & ~current_umask())
        _move_into_place(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def _move_into_place(staging: Path, output_dir: Path) -> None:
    owned = _owned_names(output_dir) or set()
    existing = {path.name for path in output_dir.iterdir()} if output_dir.is_dir() else set()
    if existing <= owned:  # nothing but a previous set (or nothing): swap whole directories
        retired = output_dir.parent / f".{output_dir.name}.retired-{os.getpid()}"
        if output_dir.exists():
            os.replace(output_dir, retired)
        os.replace(staging, output_dir)
        shutil.rmtree(retired, ignore_errors=True)
        return
    # The directory holds the user's files too (allowed by overwrite): replace our names one by one,
    # the summary last, so a reader that trusts scores.json never sees a half-replaced set.
    fresh = {path.name for path in staging.iterdir()}
    for name in sorted(fresh - {SUMMARY_NAME}) + [SUMMARY_NAME]:
        target = output_dir / name
        if target.is_dir() and not target.is_symlink():
            retired = output_dir / f".{name}.retired-{os.getpid()}"
            os.replace(target, retired)
            os.replace(staging / name, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging / name, target)
    for name in owned - fresh:  # files of the previous set the new one does not have
        stale = output_dir / name
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def scores_exist(output_dir: str | os.PathLike) -> bool:
    return _owned_names(Path(output_dir)) is not None


def load_summary(output_dir: str | os.PathLike) -> dict[str, Any]:
    output_dir = Path(output_dir)
    if not scores_exist(output_dir):
        raise AccInfError(f"No scores at {output_dir}: run `hf-accinf score` first (or pass its --output_dir).")
    return json.loads((output_dir / SUMMARY_NAME).read_text())


def load_scores(output_dir: str | os.PathLike) -> torch.Tensor:
    load_summary(output_dir)
    return load_tensors(Path(output_dir) / SCORES_NAME)["scores"]


def load_embeddings(output_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    load_summary(output_dir)
    return load_tensors(Path(output_dir) / EMBEDDINGS_NAME)
