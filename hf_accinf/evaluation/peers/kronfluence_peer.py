"""kronfluence (``pip install --no-deps kronfluence`` plus einops, einconv, opt_einsum: its torchvision
requirement is never imported and the PyPI torchvision wheel breaks a CPU torch, docs/PEERS.md): influence
functions with EK-FAC, K-FAC or the identity (gradient dot products) as the Hessian, through its
``Analyzer`` on a :class:`~kronfluence.task.Task` of the run's classification loss.

Settings: the library's defaults (true Fisher from sampled labels, damping ``1e-8``, every ``nn.Linear``
tracked: embeddings and LayerNorms are outside kronfluence's supported modules), the measurement the mean
evaluation cross-entropy hf_accinf scores (a sum over the query batch), padding masked for text. K-FAC alone
takes the library's damping heuristic (``damping_factor=None``: 0.1 x the mean eigenvalue): its eigenvalues are
products of the two factors' eigenvalues, and undamped at ``1e-8`` their tiny products swamp the scores (on
the smoke test's tiny ViT, Pearson r -0.59 against leave-one-out; 0.94 with the heuristic). EK-FAC refits
the eigenvalues and keeps the default.

Mapping to hf_accinf's convention (``s_j ~= L_val(theta^{-j}) - L_val(theta)``): kronfluence's pairwise score
of query ``q`` and training row ``j`` is ``g_q . (F + lambda)^{-1} g_j`` with ``F`` the Fisher averaged over the
training rows, positive when row ``j`` lowers the query's loss (a helpful row). Removing one of ``N`` rows moves
the optimum by ``F^{-1} g_j / N``: ``s_j = mean_q(score_qj) / N``.
"""

from __future__ import annotations

import copy
import tempfile

import torch
from torch import nn

from .problem import PeerProblem

STRATEGIES = ("ekfac", "kfac", "identity")


def _task(input_names: list[str]):
    from kronfluence.task import Task

    mask_at = input_names.index("attention_mask") if "attention_mask" in input_names else None

    class ClassificationTask(Task):
        """The run's cross-entropy; labels sampled from the model for the true Fisher (``sample=True``)."""

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            *inputs, labels = batch
            logits = model(*inputs)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return nn.functional.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model) -> torch.Tensor:
            *inputs, labels = batch
            return nn.functional.cross_entropy(model(*inputs), labels, reduction="sum")

        def get_attention_mask(self, batch):
            return None if mask_at is None else batch[mask_at]

    return ClassificationTask()


def influence(problem: PeerProblem, strategy: str = "ekfac", batch_size: int = 32,
              damping: float | None = 1e-8, seed: int = 0) -> torch.Tensor:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    task = _task(problem.model.input_names)
    model = prepare_model(copy.deepcopy(problem.model), task)  # it freezes and wraps the model in place
    with tempfile.TemporaryDirectory() as output_dir, torch.random.fork_rng():
        torch.manual_seed(seed)  # the true Fisher's sampled labels, the same on every call
        analyzer = Analyzer(analysis_name="hf_accinf", model=model, task=task, cpu=True, disable_tqdm=True,
                            output_dir=output_dir)
        analyzer.fit_all_factors(factors_name=strategy, dataset=problem.train_rows(), per_device_batch_size=batch_size,
                                 factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True)
        analyzer.compute_pairwise_scores(scores_name=strategy, factors_name=strategy,
                                         query_dataset=problem.eval_rows(), train_dataset=problem.train_rows(),
                                         per_device_query_batch_size=batch_size,
                                         per_device_train_batch_size=batch_size,
                                         score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores(strategy)["all_modules"]
    return scores.double().mean(0) / problem.num_train


def ekfac(problem: PeerProblem) -> torch.Tensor:
    return influence(problem, "ekfac")


def kfac(problem: PeerProblem) -> torch.Tensor:
    return influence(problem, "kfac", damping=None)


def identity(problem: PeerProblem) -> torch.Tensor:
    return influence(problem, "identity")
