"""dattri (``pip install dattri``): TRAK, TracIn, DVEmb and the conjugate-gradient influence function, through
its public attributors (``dattri.algorithm``) on one :class:`~dattri.task.AttributionTask`.

Mapping to hf_accinf's convention (``s_j ~= L_val(theta^{-j}) - L_val(theta)``, positive for a helpful row);
dattri returns a ``(train, test)`` matrix whose entries are positive for a helpful training row:

* ``dattri-if-cg``: ``IFAttributorCG`` gives ``g_j . H^{-1} g_q`` with ``H`` the Hessian of the mean training
  loss at the final model (CG, ``max_iter`` iterations, damping ``regularization``). Its target is the mean
  evaluation loss itself (``target_func``, one dummy query): ``g_q`` is then the gradient hf_accinf scores,
  one inverse-Hessian product in all instead of one per evaluation row (the same value: the product is
  linear in ``g_q``). Removing row ``j`` of ``N`` moves the optimum by ``H^{-1} g_j / N``: ``s_j = score_j / N``.
* ``dattri-tracin``: ``TracInAttributor`` over the per-epoch checkpoints made by replay, weights the mean
  learning rate of each epoch: ``sum_e eta_e g_j(theta_e) . g_q(theta_e)``. Row ``j`` enters one step of each
  epoch with weight ``1/B`` in a mean loss over ``B`` rows: ``s_j = mean_q(score_jq) / B``.
* ``dattri-dvemb``: ``DVEmbAttributor`` fed every recorded step's per-row gradients at the replayed
  parameters with step size ``lr_t / B`` (the per-row step of a mean loss; dattri's update has no ``1/B``),
  projected to ``proj_dim``: its score is already the change of the query loss on removal,
  ``s_j = mean_q(score_jq)``. It models SGD steps, whatever the run's optimizer.
* ``dattri-trak``: ``TRAKAttributor`` on the margin ``log p / (1 - p)`` at the final model (one checkpoint,
  projection ``proj_dim``): its scores rank rows but carry no loss scale; ``s_j = mean_q(score_jq) / N``
  (rank and correlation figures only).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .problem import PeerProblem, batched
from .trak_peer import kernel_dim

DEFAULTS = {"cg_max_iter": 10, "cg_regularization": 1e-3, "proj_dim": 512}


def _loss(model: nn.Module):
    """dattri's ``loss_func(params, data)``: the mean cross-entropy of the rows in ``data`` (torch.func style)."""
    def loss(params, data):
        *inputs, labels = batched(tuple(data))
        logits = torch.func.functional_call(model, params, tuple(inputs))
        return nn.functional.cross_entropy(logits, labels)

    return loss


def _margin(model: nn.Module):
    """TRAK's model output: ``log(p / (1 - p))`` of the correct class."""
    def margin(params, data):
        *inputs, labels = batched(tuple(data))
        logp = -nn.functional.cross_entropy(torch.func.functional_call(model, params, tuple(inputs)), labels)
        return logp - torch.log1p(-torch.exp(logp))

    return margin


def _prefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"model.{name}": tensor for name, tensor in state.items()}


def _loaders(problem: PeerProblem, train_batch: int) -> tuple[DataLoader, DataLoader]:
    return (DataLoader(problem.train_rows(), batch_size=train_batch, shuffle=False),
            DataLoader(problem.eval_rows(), batch_size=len(problem.eval[-1]), shuffle=False))


def if_cg(problem: PeerProblem, max_iter: int = DEFAULTS["cg_max_iter"],
          regularization: float = DEFAULTS["cg_regularization"]) -> torch.Tensor:
    from dattri.algorithm import IFAttributorCG
    from dattri.task import AttributionTask

    model = problem.model
    *eval_inputs, eval_labels = problem.eval

    def objective(params, _):
        """The mean evaluation loss itself (dattri's ``target_func``), whatever the (dummy) query row."""
        logits = torch.func.functional_call(model, params, tuple(eval_inputs))
        return nn.functional.cross_entropy(logits, eval_labels)

    task = AttributionTask(loss_func=_loss(model), model=model, checkpoints=model.state_dict(), target_func=objective)
    attributor = IFAttributorCG(task=task, device="cpu", max_iter=max_iter, regularization=regularization)
    train, _ = _loaders(problem, problem.num_train)
    attributor.cache(train)  # the Hessian of the mean loss over every training row (one batch)
    query = DataLoader(TensorDataset(torch.zeros(1)), batch_size=1, shuffle=False)
    with torch.no_grad():
        scores = attributor.attribute(train, query)
    return scores.double()[:, 0] / problem.num_train


def tracin(problem: PeerProblem) -> torch.Tensor:
    from dattri.algorithm import TracInAttributor
    from dattri.task import AttributionTask

    model = problem.model
    task = AttributionTask(loss_func=_loss(model), model=model,
                           checkpoints=[_prefixed(epoch.state) for epoch in problem.epochs])
    weights = torch.tensor([epoch.learning_rate for epoch in problem.epochs])
    attributor = TracInAttributor(task=task, weight_list=weights, normalized_grad=False, device="cpu")
    train, test = _loaders(problem, 32)
    scores = attributor.attribute(train, test)
    return scores.double().mean(1) / problem.batch_size


def trak(problem: PeerProblem, proj_dim: int = DEFAULTS["proj_dim"]) -> torch.Tensor:
    from dattri.algorithm import TRAKAttributor
    from dattri.task import AttributionTask

    model = problem.model

    def correct_probability(params, data):
        *inputs, labels = batched(tuple(data))
        return torch.exp(-nn.functional.cross_entropy(torch.func.functional_call(model, params, tuple(inputs)), labels))

    task = AttributionTask(loss_func=_margin(model), model=model, checkpoints=model.state_dict())
    projection = {"proj_dim": kernel_dim(proj_dim, problem.num_train), "device": "cpu"}
    attributor = TRAKAttributor(task=task, correct_probability_func=correct_probability, device="cpu",
                                projector_kwargs=projection)
    train, test = _loaders(problem, 32)
    attributor.cache(train)
    with torch.no_grad():
        scores = attributor.attribute(test)
    return scores.double().mean(1) / problem.num_train


def dvemb(problem: PeerProblem, proj_dim: int = DEFAULTS["proj_dim"]) -> torch.Tensor:
    from dattri.algorithm import DVEmbAttributor
    from dattri.task import AttributionTask

    model = problem.model_at(problem.model.model.state_dict())
    task = AttributionTask(loss_func=_loss(model), model=model, checkpoints=model.state_dict())
    attributor = DVEmbAttributor(task=task, proj_dim=proj_dim)
    for epoch, parameters, lr, rows, _ in problem.steps():
        model.model.load_state_dict(parameters, strict=True)
        batch = tuple(tensor[rows] for tensor in problem.train)
        attributor.cache_gradients(epoch, batch, rows, lr / len(rows))
    attributor.cache()
    model.model.load_state_dict(problem.model.model.state_dict())
    _, test = _loaders(problem, 32)
    scores = attributor.attribute(test)
    return scores.double().mean(1)
