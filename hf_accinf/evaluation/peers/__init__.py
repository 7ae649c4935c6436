"""Peers side by side (issue 20, item 3): other data-attribution packages scoring the same recorded run.

One small adapter module per peer (:mod:`.kronfluence_peer`, :mod:`.dattri_peer`, :mod:`.trak_peer`,
:mod:`.captum_peer`), each calling the peer's public API with its recommended settings on the
:class:`~.problem.PeerProblem` that :func:`~.problem.peer_problem` builds from a run (the final model, the rows
as tensors, per-epoch checkpoints by replay), and mapping its output to hf_accinf's convention: the predicted
change of the mean evaluation loss when the row is removed (``s_j ~= L_val(theta^{-j}) - L_val(theta)``,
DESIGN.md section 2), the sign and scale mapping written in each adapter's docstring and in docs/PEERS.md.

The peers install with the ``peers`` extra (``pip install -e ".[peers]"``) except kronfluence, installed with
``pip install --no-deps kronfluence`` (its torchvision requirement pulls a CUDA wheel that breaks a CPU torch
and, through it, ``transformers``); bergson is not adapted (docs/PEERS.md says why).

>>> problem = peer_problem("run", train_dataset, eval_dataset, collate_fn)  # doctest: +SKIP
>>> scores = score_peer("kronfluence-ekfac", problem)  # (N,) float64  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from ...errors import AccInfError
from .problem import PeerProblem, peer_problem


@dataclass(frozen=True)
class Peer:
    """One peer method: its package (import name and pip name), the adapter function, what it needs."""

    name: str
    display: str
    package: str
    pip: str
    adapter: str  # "module:function" in this package
    trajectory: bool  # needs the per-epoch checkpoints or every step's parameters (made by replay)


PEERS = {peer.name: peer for peer in (
    Peer("kronfluence-ekfac", "kronfluence EK-FAC", "kronfluence", "kronfluence", "kronfluence_peer:ekfac", False),
    Peer("kronfluence-kfac", "kronfluence K-FAC", "kronfluence", "kronfluence", "kronfluence_peer:kfac", False),
    Peer("kronfluence-identity", "kronfluence identity (gradient dot)", "kronfluence", "kronfluence",
         "kronfluence_peer:identity", False),
    Peer("dattri-if-cg", "dattri IF (CG)", "dattri", "dattri", "dattri_peer:if_cg", False),
    Peer("dattri-trak", "dattri TRAK", "dattri", "dattri", "dattri_peer:trak", False),
    Peer("dattri-tracin", "dattri TracIn (epoch checkpoints)", "dattri", "dattri", "dattri_peer:tracin", True),
    Peer("dattri-dvemb", "dattri DVEmb (k=512, every step)", "dattri", "dattri", "dattri_peer:dvemb", True),
    Peer("trak", "traker TRAK", "trak", "traker", "trak_peer:trak", False),
    Peer("captum-tracincp", "captum TracInCP (epoch checkpoints)", "captum", "captum", "captum_peer:tracincp", True),
)}


def installed(peer: Peer) -> bool:
    """Whether the peer's package imports here."""
    try:
        importlib.import_module(peer.package)
    except ImportError:
        return False
    return True


def available() -> list[str]:
    """The peers whose package is installed."""
    return [name for name, peer in PEERS.items() if installed(peer)]


def score_peer(name: str, problem: PeerProblem) -> torch.Tensor:
    """Row scores of peer ``name`` in hf_accinf's convention, ``(N,)`` float64."""
    if name not in PEERS:
        raise AccInfError(f"Unknown peer {name!r}; the peers are {', '.join(PEERS)}.")
    peer = PEERS[name]
    if not installed(peer):
        raise AccInfError(f"{peer.display} needs the {peer.package} package: pip install -e \".[peers]\" "
                          "(kronfluence: pip install --no-deps kronfluence, docs/PEERS.md).")
    if peer.trajectory and not problem.epochs:
        raise AccInfError(f"{peer.display} needs the run's trajectory: build the problem with with_epochs=True.")
    module, function = peer.adapter.split(":")
    scores = getattr(importlib.import_module(f"{__name__}.{module}"), function)(problem)
    return torch.as_tensor(scores, dtype=torch.float64).reshape(-1)


__all__ = ["PEERS", "Peer", "PeerProblem", "available", "installed", "peer_problem", "score_peer"]
