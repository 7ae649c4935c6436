"""The paper's section 7 (the broader family) on the section-6 harness: TracIn, DVEmb and ACC-DVEmb against
leave-one-out retraining of an SGD run stopped after several epochs (Table 3), and Adam-IE against ACC-Adam-IE
on an AdamW run (Table 4); SGD-IE and ACC-SGD-IE stand in Table 3 as the exact forward-form reference.

This module owns the two experiments' configuration, training recipes, ground truth and agreement rows; the
estimators are the registry's (DESIGN.md sections 3: SGD-IE, 4: Adam-IE with exact and first-order removal,
5: DVEmb and TracIn) and the metrics those of DESIGN.md section 7. Beside the truth at weight 0 (the sample
removed) every run is retrained with each sample at weight 0.5: Kendall tau between ``truth(0)`` and
``2 truth(0.5)`` is the linearity ceiling of :mod:`.verify`, how far any first-order estimate can agree with
the truth of that run (a chaotic recipe has a low ceiling, and its truth says little about the estimators).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from ...engine import estimate_influence, every_occurrence
from ...scoring.objective import scores_from_embeddings
from ...methods.registry import METHODS, build_method
from ...problem import InfluenceProblem
from .datasets import make_split
from .experiments import (ExperimentConfig, TrainedRun, build_model, epoch_batches, learning_rates, problem_of,
                          truncated_run, validation_accuracy)
from ..metrics import agreement, kendall_tau
from ..retrain import mean_loss, retrain_sgd_without, train_recorded

PERCENTS = (70, 50, 30, 10)
METRICS = ("kendall_tau",) + tuple(f"jaccard@{k}" for k in PERCENTS)
SCHEDULES = ("inverse-sqrt", "constant")


@dataclass(frozen=True)
class Estimator:
    """One row of a table: a registered method with its options."""

    method: str
    projection_dim: int | None = None  # DVEmb family: k (0: no projection)
    removal: str = "exact"  # Adam family: exact or first-order removal (DESIGN.md section 4)

    @property
    def label(self) -> str:
        name = METHODS[self.method].display
        if self.projection_dim is not None:
            return f"{name} ({'no projection' if self.projection_dim == 0 else f'k={self.projection_dim}'})"
        return f"{name} ({self.removal})" if self.method.startswith(("adam", "acc-adam")) else name

    def options(self, seed: int) -> dict:
        if self.projection_dim is not None:
            return {"projection_dim": self.projection_dim, "projection_seed": seed}
        return {"removal": self.removal}


@dataclass(frozen=True)
class SGDSetting:
    """Table 3: one SGD run of the harness's ``d-8-8-1`` MLP per seed, stopped after each of ``eval_epochs``.

    ``schedule``: ``inverse-sqrt`` is the harness's DNN convention ``lr_t = lr / sqrt(t + 1)`` (t the step);
    ``constant`` keeps ``lr`` (the paper's "learning rate 0.1" read literally). ``sweep_dims``: more DVEmb
    projection dimensions, evaluated at the last epoch only."""

    name: str = "inverse-sqrt"
    schedule: str = "inverse-sqrt"
    eval_epochs: tuple[int, ...] = (4, 16, 32)
    projection_dims: tuple[int, ...] = (128, 0)
    sweep_dims: tuple[int, ...] = ()
    experiment: ExperimentConfig = field(default_factory=lambda: ExperimentConfig("digits", "dnn"))

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Unknown schedule '{self.schedule}': use one of {SCHEDULES}.")

    def estimators(self, last_epoch: bool) -> list[Estimator]:
        dims = self.projection_dims + (self.sweep_dims if last_epoch else ())
        dvemb = [Estimator(method, dim) for dim in dims for method in ("dvemb", "acc-dvemb")]
        return [Estimator("tracin"), *dvemb, Estimator("sgd-ie"), Estimator("acc-sgd-ie")]


@dataclass(frozen=True)
class AdamRecipe:
    """Table 4: an AdamW run of the same data and model, with the HF Trainer's linear schedule (warm-up over
    ``ceil(warmup_ratio T)`` steps from 0, then linear decay to 0), global clipping, and decoupled weight decay
    on weights only (HF exempts biases)."""

    name: str = "relu"
    lr: float = 0.02
    epochs: int = 4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    activation: str = "relu"
    experiment: ExperimentConfig = field(default_factory=lambda: ExperimentConfig("digits", "dnn"))

    def estimators(self) -> list[Estimator]:
        return [Estimator(method, removal=removal) for method in ("adam-ie", "acc-adam-ie")
                for removal in ("exact", "first-order")]


def hf_linear_rates(num_steps: int, peak: float, warmup_ratio: float) -> list[float]:
    """The HF Trainer's ``linear`` schedule (``get_linear_schedule_with_warmup``, ``ceil(ratio T)`` warm-up steps
    as ``TrainingArguments.get_warmup_steps``) over ``num_steps`` steps; the first step's rate is 0 when warming up."""
    warmup = math.ceil(warmup_ratio * num_steps)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    schedule = get_linear_schedule_with_warmup(optimizer, warmup, num_steps)
    return [peak * schedule.lr_lambdas[0](step) for step in range(num_steps)]


def train_with(config: ExperimentConfig, optimizer: str, rates: Callable[[int], list[float]], **options) -> TrainedRun:
    """Train the configuration's model with ``optimizer`` and the learning rates ``rates(num_steps)``; record it."""
    split = make_split(config.dataset, config.seed, config.noise, config.n_train, config.n_val, config.n_test)
    model = build_model(config, split.num_features)
    batches = epoch_batches(config.n_train, config.batch_size, config.epochs, config.seed)
    trajectory, spec = train_recorded(model, split.x_train, split.y_train, batches, rates(len(batches)), optimizer,
                                      **options)
    trajectory.epoch = torch.arange(trajectory.num_steps) // config.steps_per_epoch
    final = {name: p.detach().clone() for name, p in model.named_parameters()}
    return TrainedRun(config, split, model, trajectory, spec, final, options.get("weight_decay", 0.0))


def train_sgd_setting(setting: SGDSetting, seed: int) -> TrainedRun:
    config = replace(setting.experiment, seed=seed, epochs=max(setting.eval_epochs))
    if setting.schedule == "constant":
        return train_with(config, "SGD", lambda steps: [config.lr] * steps)
    return train_with(config, "SGD", lambda steps: learning_rates(config, steps))


def train_adam_recipe(recipe: AdamRecipe, seed: int) -> TrainedRun:
    config = replace(recipe.experiment, seed=seed, epochs=recipe.epochs, activation=recipe.activation)
    return train_with(config, "AdamW", lambda steps: hf_linear_rates(steps, recipe.lr, recipe.warmup_ratio),
                      weight_decay=recipe.weight_decay, max_grad_norm=recipe.max_grad_norm, no_decay=("bias",))


def loss_changes(run: TrainedRun, weight: float) -> torch.Tensor:
    """``L_val(theta^{j -> weight}) - L_val(theta)`` for every training row ``j``: the run retrained with row
    ``j``'s loss weight multiplied by ``weight`` at every occurrence (0: left out), same divisor and batches."""
    num_rows = len(run.split.y_train)
    keep = torch.ones(num_rows, num_rows, dtype=torch.float64)
    keep.diagonal().fill_(weight)
    retrained = retrain_sgd_without(run.model, run.trajectory, run.spec, run.split.x_train, run.split.y_train, keep)
    base = mean_loss(run.model, {k: v[None] for k, v in run.final.items()}, run.split.x_val, run.split.y_val)[0]
    return mean_loss(run.model, retrained, run.split.x_val, run.split.y_val) - base


def estimator_scores(run: TrainedRun, problem: InfluenceProblem, estimator: Estimator,
                     kinds: tuple[str, ...] = ("linear",)) -> dict[str, torch.Tensor]:
    """Scores of every training row on the run's validation set, per score kind (TracIn: linear only)."""
    return _scores_and_embeddings(run, problem, estimator, kinds)[0]


def _scores_and_embeddings(run: TrainedRun, problem: InfluenceProblem, estimator: Estimator,
                           kinds: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    x_val, y_val = run.split.x_val, run.split.y_val
    curvature = problem.curvature
    if estimator.method == "tracin":
        params = run.trajectory.params
        return {"linear": build_method(problem, "tracin").scores(
            lambda step: curvature.objective_grad({n: v[step] for n, v in params.items()}, x_val, y_val))}, None
    rule = build_method(problem, estimator.method, **estimator.options(run.config.seed))
    embeddings = estimate_influence(problem, rule, every_occurrence(rule), progress=False).embeddings
    return {kind: scores_from_embeddings(curvature, embeddings, run.final, x_val, y_val, kind, rule=rule)
            for kind in kinds}, embeddings


def relative_change(changed: torch.Tensor, reference: torch.Tensor) -> float:
    """Median over rows of ``||changed_j - reference_j|| / ||reference_j||``."""
    ratio = (changed - reference).norm(dim=1) / reference.norm(dim=1).clamp_min(torch.finfo(reference.dtype).tiny)
    return float(ratio.median())


def _rows(run: TrainedRun, truth: torch.Tensor, estimators: list[Estimator], kinds: tuple[str, ...],
          **context) -> list[dict]:
    """One agreement row per estimator and score kind; an ACC row also carries ``acc_change``, the relative
    change of its embeddings against its classical twin's (``None`` where the twin is not in ``estimators``)."""
    problem = problem_of(run)
    rows, classical = [], {}
    for estimator in estimators:
        began = time.perf_counter()
        scores, embeddings = _scores_and_embeddings(run, problem, estimator, kinds)
        seconds = time.perf_counter() - began
        twin = replace(estimator, method=estimator.method.removeprefix("acc-"))
        acc_change = None
        if embeddings is not None and twin != estimator and twin in classical:
            acc_change = relative_change(embeddings, classical[twin])
        elif embeddings is not None:
            classical[estimator] = embeddings
        for kind, score in scores.items():
            report = agreement(score, truth, percents=PERCENTS)
            rows.append({**context, "estimator": estimator.label, "method": estimator.method,
                         "projection_dim": estimator.projection_dim, "removal": estimator.removal, "score": kind,
                         "seconds": seconds, "acc_change": acc_change,
                         **{metric: report[metric] for metric in METRICS}})
    return rows


def _run_info(run: TrainedRun, truth: torch.Tensor, half: torch.Tensor, **context) -> dict:
    return {**context, "val_accuracy": validation_accuracy(run),
            "linearity_ceiling": kendall_tau(truth, 2 * half),
            "clipped_steps": float((run.trajectory.clip_coef < 1).double().mean())}


def sgd_seed(setting: SGDSetting, seed: int) -> tuple[list[dict], list[dict]]:
    """Table 3 for one seed: agreement rows (one per epoch, estimator) and run rows (accuracy, ceiling)."""
    full = train_sgd_setting(setting, seed)
    rows, runs = [], []
    for epoch in setting.eval_epochs:
        run = truncated_run(full, epoch * full.config.steps_per_epoch)
        context = {"setting": setting.name, "seed": seed, "epoch": epoch}
        truth, half = loss_changes(run, 0.0), loss_changes(run, 0.5)
        runs.append(_run_info(run, truth, half, **context))
        rows += _rows(run, truth, setting.estimators(epoch == max(setting.eval_epochs)), ("linear",), **context)
    return rows, runs


def adam_seed(recipe: AdamRecipe, seed: int) -> tuple[list[dict], list[dict]]:
    """Table 4 for one seed: Adam-IE and ACC-Adam-IE, both removals, cosine and linear scores; TracIn beside."""
    run = train_adam_recipe(recipe, seed)
    context = {"setting": recipe.name, "seed": seed, "epoch": recipe.epochs}
    truth, half = loss_changes(run, 0.0), loss_changes(run, 0.5)
    rows = _rows(run, truth, recipe.estimators(), ("cosine", "linear"), **context)
    rows += _rows(run, truth, [Estimator("tracin")], ("linear",), **context)
    return rows, [_run_info(run, truth, half, **context)]


def summarize(rows: list[dict], keys: tuple[str, ...], values: tuple[str, ...]) -> list[dict]:
    """Mean and std over seeds of ``values`` for every distinct combination of ``keys`` (first-seen order)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    summary = []
    for key, members in groups.items():
        entry = dict(zip(keys, key), seeds=len(members))
        for value in values:
            data = np.array([m[value] for m in members], dtype=np.float64)
            entry[value], entry[f"{value}_std"] = float(data.mean()), float(data.std())
        summary.append(entry)
    return summary
