"""Scoring output directories written by ``hf_accinf.scoring.artifacts`` as ``score_run`` writes them, made
without a run (fast fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from hf_accinf.scoring import artifacts


def fake_run_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps({"schema_version": 1, "note": "stand-in manifest"}))
    return path


def fake_scores_dir(path: Path, scores: np.ndarray, method: str, run_dir: Path, trust: dict | None = None,
                    verify: dict | None = None) -> Path:
    """``scores.safetensors`` and ``scores.json`` (plus optional trust and verify figures) through the writer of
    ``hf_accinf.scoring.artifacts``."""
    order = np.argsort(scores)
    summary = artifacts.ScoreSummary(
        run=artifacts.RunIdentity(str(run_dir), artifacts.manifest_sha256(run_dir)), method=method,
        column=artifacts.column_name(method),
        arguments={"run_dir": str(run_dir), "method": method, "removal": "exact", "score_kind": "linear", "modules": None},
        removal="exact", schedule="sweep", seconds=0.1, trust=trust, verify=verify,
        evaluation=artifacts.EvaluationSet(20, "0" * 64, "a stand-in evaluation set"),
        most_harmful=order[:10].tolist(), most_helpful=order[::-1][:10].tolist(), extra={"future_field": {"ignored": True}})
    writers = {artifacts.SCORES_NAME: lambda file: save_file(
        {"scores": torch.as_tensor(scores, dtype=torch.float64).contiguous()}, file, metadata={"method": method})}
    artifacts.write_set(path, writers, summary)
    return path
