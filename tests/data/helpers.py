"""Scoring output directories in the format ``score_run`` writes, made without a run (fast fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def fake_run_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps({"schema_version": 1, "note": "stand-in manifest"}))
    return path


def fake_scores_dir(path: Path, scores: np.ndarray, method: str, run_dir: Path, trust: dict | None = None) -> Path:
    """``scores.safetensors`` and ``scores.json`` as ``hf_accinf.scoring`` writes them (plus optional trust figures)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({"scores": torch.as_tensor(scores, dtype=torch.float64).contiguous()}, path / "scores.safetensors",
              metadata={"method": method})
    order = np.argsort(scores)
    summary = {
        "arguments": {"run_dir": str(run_dir), "method": method, "removal": "exact", "score_kind": "linear", "modules": None},
        "schedule": "sweep", "seconds": 0.1, "column": "influence_" + method.replace("-", "_"),
        "most_harmful": order[:10].tolist(), "most_helpful": order[::-1][:10].tolist(),
        "future_field": {"ignored": True},
    }
    if trust is not None:
        summary["trust"] = trust
    (path / "scores.json").write_text(json.dumps(summary))
    return path
