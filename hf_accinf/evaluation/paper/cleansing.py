"""Data cleansing as a downstream check (the paper's section 6.5, Hara et al. 2019).

Score every training row, remove the ``k`` most harmful (most negative score: removing them is predicted
to lower the validation loss), retrain from the same initial weights with the recorded batches, learning
rates and weight decay, the removed rows dropped from their batches (the counterfactual the estimators
model, as in Hara et al.'s code), and measure the misclassification rate on held-out test rows. Rankings compared: SGD-IE, ACC-SGD-IE, the leave-one-out
truth itself (an oracle) and random removal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from torch.func import functional_call, vmap

from .experiments import ESTIMATORS, ExperimentConfig, TrainedRun, estimate_scores, leave_one_out_truth, train
from ..retrain import retrain_sgd_without

RANDOM = "random"
ORACLE = "leave-one-out"


@dataclass(frozen=True)
class CleansingConfig:
    experiment: ExperimentConfig
    removals: tuple[int, ...] = (0, 10, 20, 40, 60, 80)
    random_draws: int = 3
    kind: str = "linear"


@dataclass
class CleansingResult:
    config: CleansingConfig
    test_error: dict[str, list[float]]  # ranking -> misclassification rate per removal count
    corrupted_found: dict[str, list[float]] = field(default_factory=dict)  # ranking -> share of removed rows corrupted


def test_errors_without(run: TrainedRun, removed: list[np.ndarray]) -> np.ndarray:
    """Test misclassification rate of the run retrained without each set in ``removed`` (vectorized)."""
    split = run.split
    keep = torch.ones(len(removed), len(split.y_train), dtype=torch.float64)
    for row, rows in enumerate(removed):
        keep[row, torch.as_tensor(rows, dtype=torch.long)] = 0
    params = retrain_sgd_without(run.model, run.trajectory, run.spec, split.x_train, split.y_train, keep)
    logits = vmap(lambda p: functional_call(run.model, p, (split.x_test,)))(params)
    return (logits.argmax(-1) != split.y_test).double().mean(-1).numpy()


def run_cleansing(config: CleansingConfig) -> CleansingResult:
    run = train(config.experiment)
    rankings = {method: np.argsort(estimate_scores(run, method)[1][config.kind].numpy(), kind="stable")
                for method in ESTIMATORS}
    rankings[ORACLE] = np.argsort(leave_one_out_truth(run)[0].numpy(), kind="stable")
    rng = np.random.default_rng(config.experiment.seed)
    draws = [rng.permutation(len(run.split.y_train)) for _ in range(config.random_draws)]
    sets = [order[:k] for order in rankings.values() for k in config.removals]
    sets += [draw[:k] for draw in draws for k in config.removals]
    errors = test_errors_without(run, sets).reshape(len(rankings) + len(draws), len(config.removals))
    corrupted = run.split.corrupted.numpy()
    found = np.array([corrupted[rows].mean() if len(rows) else 0.0 for rows in sets]).reshape(errors.shape)
    names = list(rankings)
    result = CleansingResult(config, {n: errors[i].tolist() for i, n in enumerate(names)},
                             {n: found[i].tolist() for i, n in enumerate(names)})
    result.test_error[RANDOM] = errors[len(names):].mean(0).tolist()
    result.corrupted_found[RANDOM] = found[len(names):].mean(0).tolist()
    return result
