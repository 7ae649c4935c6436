"""One configuration of the paper's evaluation (sections 6.1-6.4): train, retrain leave-one-out, estimate, compare.

The training conventions are those DESIGN.md section 7 names for the authors' code: inputs standardized,
``n_train = n_val = 400``, batch 100, learning rate 0.1; the non-convex model is a ``d-8-8-1`` MLP (ReLU)
trained with ``lr_0 / sqrt(t + 1)`` and no weight decay; the convex model is logistic regression with a
constant learning rate and L2 weight decay ``alpha = 1 / (C n)``, ``C`` chosen by ``LogisticRegressionCV``.
Both have one logit ``z`` read as the cross-entropy logits ``[0, z]`` (binary cross-entropy).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import nn

from ...engine import estimate_influence, every_occurrence
from ...scoring.objective import scores_from_embeddings
from ...methods.registry import build_method, method_names
from ...problem import InfluenceProblem, make_curvature
from ...trajectory import Trajectory
from .datasets import NoiseSetting, Split, make_split
from ..metrics import agreement
from ..retrain import leave_one_out_sgd, mean_loss, train_sgd

MODELS = ("dnn", "logreg")
ESTIMATORS = tuple(n for n in method_names("SGD", output="embeddings") if n.endswith("sgd-ie"))  # sections 6.1-6.4


class ZeroLogit(nn.Module):
    """One logit ``z`` as the two cross-entropy logits ``[0, z]``: binary cross-entropy."""

    def forward(self, logit: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(logit), logit], dim=-1)


@dataclass(frozen=True)
class ExperimentConfig:
    """One cell of the paper's tables: dataset, regime, noise and seed, with the training recipe."""

    dataset: str
    model: str
    noise: NoiseSetting = NoiseSetting()
    seed: int = 0
    epochs: int = 30
    batch_size: int = 100
    lr: float = 0.1
    n_train: int = 400
    n_val: int = 400
    n_test: int = 0
    hidden: tuple[int, ...] = (8, 8)
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"Unknown model '{self.model}': use one of {MODELS}.")
        if self.n_train % self.batch_size:
            raise ValueError("n_train must be a multiple of batch_size (equal batches, as in the paper).")

    @property
    def steps_per_epoch(self) -> int:
        return self.n_train // self.batch_size


@dataclass
class TrainedRun:
    """A recorded training run with everything the estimators and the retraining need."""

    config: ExperimentConfig
    split: Split
    model: nn.Module
    trajectory: Trajectory
    spec: object
    final: dict[str, torch.Tensor]
    weight_decay: float


@dataclass
class ConfigurationResult:
    """Agreement of each estimator with leave-one-out retraining, per score kind, plus parameter-space error."""

    config: ExperimentConfig
    metrics: dict[str, dict[str, dict[str, float]]]  # estimator -> score kind -> metric -> value
    shift_error: dict[str, float]  # estimator -> mean ||Delta_est - Delta_true|| / ||Delta_true||
    val_accuracy: float
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["config"]["noise"] = asdict(self.config.noise)
        return data


def build_model(config: ExperimentConfig, num_features: int) -> nn.Module:
    torch.manual_seed(config.seed)
    if config.model == "logreg":
        return nn.Sequential(nn.Linear(num_features, 1), ZeroLogit()).double()
    activation = {"relu": nn.ReLU, "tanh": nn.Tanh}[config.activation]
    layers, width = [], num_features
    for size in config.hidden:
        layers += [nn.Linear(width, size), activation()]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, 1), ZeroLogit()).double()


def logreg_weight_decay(split: Split, seed: int) -> float:
    """``alpha = 1 / (C n)`` with ``C`` from 5-fold ``LogisticRegressionCV``, as the authors' code."""
    from sklearn.linear_model import LogisticRegressionCV

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        fitted = LogisticRegressionCV(cv=5, random_state=seed, max_iter=2000).fit(split.x_train.numpy(),
                                                                                  split.y_train.numpy())
    return float(1.0 / (fitted.C_[0] * len(split.y_train)))


def epoch_batches(num_rows: int, batch_size: int, epochs: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(10_000 + seed)
    return [b for _ in range(epochs) for b in torch.randperm(num_rows, generator=generator).split(batch_size)]


def learning_rates(config: ExperimentConfig, num_steps: int) -> list[float]:
    if config.model == "dnn":
        return [config.lr / math.sqrt(t + 1) for t in range(num_steps)]
    return [config.lr] * num_steps


def train(config: ExperimentConfig, split: Split | None = None, weight_decay: float | None = None) -> TrainedRun:
    """Train the configuration's model on its split (drawn from the seed unless given) and record it."""
    split = split or make_split(config.dataset, config.seed, config.noise, config.n_train, config.n_val, config.n_test)
    if weight_decay is None:
        weight_decay = logreg_weight_decay(split, config.seed) if config.model == "logreg" else 0.0
    model = build_model(config, split.num_features)
    batches = epoch_batches(len(split.y_train), config.batch_size, config.epochs, config.seed)
    trajectory, spec = train_sgd(model, split.x_train, split.y_train, batches, learning_rates(config, len(batches)),
                                 weight_decay=weight_decay)
    trajectory.epoch = torch.arange(trajectory.num_steps) // (len(split.y_train) // config.batch_size)
    final = {name: p.detach().clone() for name, p in model.named_parameters()}
    return TrainedRun(config, split, model, trajectory, spec, final, weight_decay)


def problem_of(run: TrainedRun) -> InfluenceProblem:
    curvature = make_curvature(run.trajectory, run.model, list(run.spec.group_of), 0.0, torch.float64, "cpu")
    return InfluenceProblem(run.trajectory, curvature, run.spec, len(run.split.y_train))


def flat(params: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([params[n].flatten(1) for n in names], 1)


def leave_one_out_truth(run: TrainedRun) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation-loss changes ``L_val(theta^{-j}) - L_val(theta)`` and parameter shifts of all samples."""
    samples = torch.arange(len(run.split.y_train))
    retrained = leave_one_out_sgd(run.model, run.trajectory, run.spec, run.split.x_train, run.split.y_train, samples)
    base = mean_loss(run.model, {k: v[None] for k, v in run.final.items()}, run.split.x_val, run.split.y_val)[0]
    truth = mean_loss(run.model, retrained, run.split.x_val, run.split.y_val) - base
    names = list(run.spec.group_of)
    return truth, flat(retrained, names) - flat({k: v[None] for k, v in run.final.items()}, names)


def estimate_scores(run: TrainedRun, method: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Influence embeddings of ``method`` and the scores of both kinds on the validation set."""
    problem = problem_of(run)
    rule = build_method(problem, method)
    embeddings = estimate_influence(problem, rule, every_occurrence(rule), progress=False).embeddings
    scores = {kind: scores_from_embeddings(problem.curvature, embeddings, run.final, run.split.x_val, run.split.y_val,
                                           kind=kind) for kind in ("linear", "evaluated")}
    return embeddings, scores


def validation_accuracy(run: TrainedRun) -> float:
    with torch.no_grad():
        logits = torch.func.functional_call(run.model, run.final, (run.split.x_val,))
    return float((logits.argmax(-1) == run.split.y_val).double().mean())


def run_configuration(config: ExperimentConfig) -> ConfigurationResult:
    """Train, retrain every sample out, run SGD-IE and ACC-SGD-IE, and measure their agreement with the truth."""
    seconds = {}
    began = time.perf_counter()
    run = train(config)
    seconds["train"] = time.perf_counter() - began
    began = time.perf_counter()
    truth, true_shift = leave_one_out_truth(run)
    seconds["leave_one_out"] = time.perf_counter() - began
    metrics, shift_error = {}, {}
    for method in ESTIMATORS:
        began = time.perf_counter()
        embeddings, scores = estimate_scores(run, method)
        seconds[method] = time.perf_counter() - began
        metrics[method] = {kind: agreement(score, truth) for kind, score in scores.items()}
        error = (embeddings - true_shift).norm(dim=1) / true_shift.norm(dim=1).clamp_min(1e-300)
        shift_error[method] = float(error.mean())
    return ConfigurationResult(config, metrics, shift_error, validation_accuracy(run), seconds)


def truncate(trajectory: Trajectory, num_steps: int) -> Trajectory:
    """The first ``num_steps`` steps of a trajectory (a run stopped early with the same batches and rates)."""
    rows = int(trajectory.row_offsets[num_steps])
    per_row = ("row_index", "row_weight", "labels", "head_input")
    per_step = ("lr", "clip_coef", "grad_norm", "epoch", "optimizer_step_count", "loss")
    fields = {name: getattr(trajectory, name)[:rows] for name in per_row}
    fields.update({name: getattr(trajectory, name)[:num_steps] for name in per_step})
    fields.update({name: {k: v[:num_steps] for k, v in getattr(trajectory, name).items()}
                   for name in ("params", "grads", "states")})
    return Trajectory(row_offsets=trajectory.row_offsets[: num_steps + 1], **fields)


def final_params_at(run: TrainedRun, num_steps: int) -> dict[str, torch.Tensor]:
    """Parameters after ``num_steps`` steps: the recorded value before the next step (or the final one)."""
    if num_steps == run.trajectory.num_steps:
        return run.final
    return {name: run.trajectory.params[name][num_steps] for name in run.final}


def truncated_run(run: TrainedRun, num_steps: int) -> TrainedRun:
    return TrainedRun(run.config, run.split, run.model, truncate(run.trajectory, num_steps), run.spec,
                      final_params_at(run, num_steps), run.weight_decay)


def long_epoch_curve(config: ExperimentConfig, eval_epochs: list[int]) -> dict[str, np.ndarray]:
    """RMSE and Jaccard@10 (both score kinds) and the parameter-space error of both estimators against
    the truth after each of ``eval_epochs`` (section 6.4). Keys: ``method/kind/metric`` and ``method/shift_error``.

    One run of ``max(eval_epochs)`` epochs; stopping it after ``e`` epochs is the run of ``e`` epochs
    (same batches and learning rates), so truth and estimates at ``e`` use its first ``e`` epochs.
    """
    full = train(replace(config, epochs=max(eval_epochs)))
    curves: dict[str, np.ndarray] = {}

    def put(key: str, index: int, value: float) -> None:
        curves.setdefault(key, np.zeros(len(eval_epochs)))[index] = value

    for index, epoch in enumerate(eval_epochs):
        run = truncated_run(full, epoch * config.steps_per_epoch)
        truth, true_shift = leave_one_out_truth(run)
        for method in ESTIMATORS:
            embeddings, scores = estimate_scores(run, method)
            for kind, score in scores.items():
                report = agreement(score, truth, percents=(10,))
                put(f"{method}/{kind}/rmse", index, report["rmse"])
                put(f"{method}/{kind}/jaccard@10", index, report["jaccard@10"])
            error = (embeddings - true_shift).norm(dim=1) / true_shift.norm(dim=1).clamp_min(1e-300)
            put(f"{method}/shift_error", index, float(error.mean()))
    return curves
