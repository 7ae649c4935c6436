"""traker (``pip install traker``, import name ``trak``): TRAK by its authors' package, ``trak.TRAKer``, on the
final model (one checkpoint, as hf_accinf scores one trained model), CPU: the ``BasicProjector`` with normal
projections (the CUDA projector needs the ``fast_jl`` extension), float32, projection dimension 512 capped at
``N / 2`` (:func:`kernel_dim`), in two blocks (traker's one-block projector is lost after featurizing).

The model output is TRAK's classification margin ``log p / (1 - p)`` of the correct class and the
out-to-loss term ``1 - p`` (``trak.modelout_functions.AbstractModelOutput``, written for positional HF inputs).

Mapping to hf_accinf's convention (``s_j ~= L_val(theta^{-j}) - L_val(theta)``): TRAK's score of training
row ``j`` and target ``q`` estimates how much including ``j`` raises ``q``'s margin, positive for a helpful
row, so removing it raises the loss: ``s_j = mean_q(score_jq) / N``. TRAK's scale is not a loss change
(random projection, one model): only rank and correlation figures are comparable.
"""

from __future__ import annotations

import math
import tempfile

import numpy as np
import torch
from torch.utils.data import DataLoader

from .problem import PeerProblem

PROJ_DIM = 512


def kernel_dim(proj_dim: int, num_train: int) -> int:
    """TRAK's kernel ``Phi^T Phi`` is ``k x k`` of rank at most ``N``: at ``k >= N`` it is singular and its
    unregularised inverse is noise, so ``k`` is capped at ``N / 2``."""
    return max(1, min(proj_dim, num_train // 2))


def _model_output():
    from trak.modelout_functions import AbstractModelOutput

    class MarginOutput(AbstractModelOutput):
        """TRAK's margin and out-to-loss term for a model called on positional tensors ``(*inputs, labels)``."""

        def __init__(self) -> None:
            super().__init__()

        @staticmethod
        def get_output(model, weights, buffers, *row) -> torch.Tensor:
            *inputs, label = (tensor.unsqueeze(0) for tensor in row)
            logits = torch.func.functional_call(model, (weights, buffers), tuple(inputs))
            correct = logits.gather(1, label[:, None]).squeeze(1)
            others = logits.scatter(1, label[:, None], -torch.inf)
            return (correct - others.logsumexp(dim=-1)).sum()

        def get_out_to_loss_grad(self, model, weights, buffers, batch) -> torch.Tensor:
            *inputs, labels = batch
            logits = torch.func.functional_call(model, (weights, buffers), tuple(inputs))
            probability = torch.softmax(logits, -1).gather(1, labels[:, None])
            return (1 - probability).detach()

    return MarginOutput()


def trak(problem: PeerProblem, proj_dim: int = PROJ_DIM, batch_size: int = 32) -> torch.Tensor:
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    model = problem.model
    proj_dim = kernel_dim(proj_dim, problem.num_train)
    # Two blocks: traker's BasicProjector frees its matrix after featurizing and, for a single block, never
    # rebuilds it before scoring.
    projector = BasicProjector(grad_dim=sum(p.numel() for p in model.parameters() if p.requires_grad),
                               proj_dim=proj_dim, seed=0, proj_type=ProjectionType.normal, device="cpu",
                               block_size=max(1, math.ceil(proj_dim / 2)))
    with tempfile.TemporaryDirectory() as save_dir:
        traker = TRAKer(model=model, task=_model_output(), train_set_size=problem.num_train, save_dir=save_dir,
                        device="cpu", projector=projector, use_half_precision=False,
                        logging_level=40)
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for batch in DataLoader(problem.train_rows(), batch_size=batch_size):
            traker.featurize(batch=list(batch), num_samples=len(batch[-1]))
        traker.finalize_features()
        traker.start_scoring_checkpoint(exp_name="eval", checkpoint=model.state_dict(), model_id=0,
                                        num_targets=len(problem.eval[-1]))
        for batch in DataLoader(problem.eval_rows(), batch_size=batch_size):
            traker.score(batch=list(batch), num_samples=len(batch[-1]))
        scores = torch.as_tensor(np.array(traker.finalize_scores(exp_name="eval")), dtype=torch.float64)
    return scores.mean(1) / problem.num_train
