"""captum (``pip install captum``): TracInCP, ``captum.influence.TracInCP``, over the per-epoch checkpoints
that :func:`~.problem.peer_problem` takes from the recorded run (rebuilt by replay between recorded
checkpoints), each weighted by the mean learning rate of its epoch: the checkpoints the TracIn paper
prescribes, not the two end points of the run.

Settings: every parameter (``layers=None``), per-row gradients by captum's exact per-sample loop
(``sample_wise_grads_per_batch=False``: its batched path covers only Linear and Conv2d), cross-entropy per row.

Mapping to hf_accinf's convention (``s_j ~= L_val(theta^{-j}) - L_val(theta)``): captum's score of test row
``q`` and training row ``j`` is ``sum_e eta_e g_j(theta_e) . g_q(theta_e)``, positive for a proponent (a row
whose steps lowered the query's loss). Row ``j`` enters each epoch's steps with weight ``1/B`` in a mean loss
over ``B`` rows, so removing it changes the loss by about ``s_j = mean_q(score_qj) / B`` (TracIn's SGD
first-order estimate; under Adam only its ranking is comparable).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from .problem import PeerProblem


def _load(model: nn.Module, path: str) -> float:
    saved = torch.load(path, weights_only=True)
    model.model.load_state_dict(saved["state"], strict=True)
    model.eval()
    return float(saved["learning_rate"])


def tracincp(problem: PeerProblem) -> torch.Tensor:
    from captum.influence import TracInCP

    model = problem.model_at(problem.model.model.state_dict())
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for index, epoch in enumerate(problem.epochs):
            paths.append(str(Path(folder) / f"epoch-{index}.pt"))
            torch.save({"state": epoch.state, "learning_rate": epoch.learning_rate}, paths[-1])
        tracin = TracInCP(model, problem.train_rows(), paths, checkpoints_load_func=_load,
                          loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=32,
                          sample_wise_grads_per_batch=False)
        scores = tracin.influence(problem.eval, show_progress=False)
    return scores.double().mean(0) / problem.batch_size
