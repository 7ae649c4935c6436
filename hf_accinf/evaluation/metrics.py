"""Agreement of estimated scores with ground truth (DESIGN.md section 7, as in the paper's evaluation code)."""

from __future__ import annotations

import numpy as np
from scipy import stats


def _array(values) -> np.ndarray:
    return np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64).ravel()


def rmse(estimate, truth) -> float:
    estimate, truth = _array(estimate), _array(truth)
    return float(np.sqrt(np.mean((estimate - truth) ** 2)))


def kendall_tau(estimate, truth) -> float:
    return float(stats.kendalltau(_array(estimate), _array(truth)).statistic)


def tails(values, percent: float) -> set[int]:
    """The ``floor(c/2)`` lowest and ``ceil(c/2)`` highest indices, ``c = int(n * percent / 100)``."""
    values = _array(values)
    count = int(len(values) * percent / 100)
    order = np.argsort(values, kind="stable")
    low, high = count // 2, count - count // 2
    return set(order[:low].tolist()) | set(order[len(values) - high :].tolist()) if high else set(order[:low].tolist())


def jaccard(estimate, truth, percent: float) -> float:
    a, b = tails(estimate, percent), tails(truth, percent)
    return len(a & b) / len(a | b) if a | b else 1.0


def agreement(estimate, truth, percents=(10, 30, 50, 70)) -> dict[str, float]:
    """RMSE, Kendall tau and two-tailed Jaccard@k of an estimate against the truth."""
    report = {"rmse": rmse(estimate, truth), "kendall_tau": kendall_tau(estimate, truth)}
    report.update({f"jaccard@{k}": jaccard(estimate, truth, k) for k in percents})
    return report
