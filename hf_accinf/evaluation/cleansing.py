"""Data cleansing as a downstream check (the paper's section 6.5, Hara et al. 2019).

Score every training row, remove the ``k`` most harmful (most negative score: removing them is predicted
to lower the validation loss), retrain from scratch with the same recipe (same initial weights, a fresh
shuffle of the remaining rows, same learning-rate schedule and weight decay), and measure the
misclassification rate on held-out test rows. Rankings compared: SGD-IE, ACC-SGD-IE, the leave-one-out
truth itself (an oracle) and random removal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .experiments import (ESTIMATORS, ExperimentConfig, TrainedRun, build_model, epoch_batches, estimate_scores,
                          leave_one_out_truth, learning_rates, train)
from .retrain import train_sgd

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


def test_error_without(run: TrainedRun, removed: np.ndarray) -> float:
    """Retrain ``run``'s recipe without ``removed`` rows and return its test misclassification rate."""
    config, split = run.config, run.split
    keep = torch.tensor(np.setdiff1d(np.arange(len(split.y_train)), removed))
    model = build_model(config, split.num_features)
    batches = epoch_batches(len(keep), config.batch_size, config.epochs, config.seed)
    train_sgd(model, split.x_train[keep], split.y_train[keep], batches, learning_rates(config, len(batches)),
              weight_decay=run.weight_decay)
    with torch.no_grad():
        predictions = model(split.x_test).argmax(-1)
    return float((predictions != split.y_test).double().mean())


def run_cleansing(config: CleansingConfig) -> CleansingResult:
    run = train(config.experiment)
    rankings = {method: np.argsort(estimate_scores(run, method)[1][config.kind].numpy(), kind="stable")
                for method in ESTIMATORS}
    rankings[ORACLE] = np.argsort(leave_one_out_truth(run)[0].numpy(), kind="stable")
    corrupted = run.split.corrupted.numpy()
    errors: dict[str, list[float]] = {}
    found: dict[str, list[float]] = {}
    for name, order in rankings.items():
        errors[name] = [test_error_without(run, order[:k]) for k in config.removals]
        found[name] = [float(corrupted[order[:k]].mean()) if k else 0.0 for k in config.removals]
    rng = np.random.default_rng(config.experiment.seed)
    draws = [rng.permutation(len(corrupted)) for _ in range(config.random_draws)]
    errors[RANDOM] = [float(np.mean([test_error_without(run, d[:k]) for d in draws])) for k in config.removals]
    found[RANDOM] = [float(np.mean([corrupted[d[:k]].mean() for d in draws])) if k else 0.0 for k in config.removals]
    return CleansingResult(config, errors, found)
