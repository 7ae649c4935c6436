"""No host synchronisation inside the step loops (issue 19 item 1): the adjoint, the sweep and the propagator
run with every device tensor on PyTorch's ``meta`` device, which holds shapes and no values.

Any read of a device value on the host (``.item()``, ``float()``, ``bool()``, ``int()``, ``.tolist()``, a
Python ``if`` on a tensor) or any data-dependent shape (boolean-mask indexing, ``nonzero``, ``.any()`` used
as a branch) raises there, exactly where it would stall a GPU; tensors left on the CPU and mixed with device
tensors raise too. The trajectory stays on the host, as it does when scoring on a GPU. What the meta device
cannot see: host-to-device copies (``.to(device)`` of host tensors, a synchronising copy on CUDA); the
CUDA-marked test in tests/test_devices.py checks the same loops under ``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_accinf.engine import estimate_influence, every_occurrence
from hf_accinf.engine.adjoint import adjoint_scores
from hf_accinf.engine.trust import ProbeGrowth
from hf_accinf.methods.registry import build_method
from hf_accinf.methods.sgd import SGDStep
from hf_accinf.problem import make_curvature
from tests.engine.helpers import make_problem
from tests.methods.helpers import make_adam_problem

META = torch.device("meta")


def _on_device(problem, backend: str, device: torch.device = META):
    """``problem`` with its curvature (and so every tensor the engine makes from it) on ``device``."""
    chosen = [name for name, _ in problem.model.named_parameters()]
    problem.curvature = make_curvature(problem.trajectory, problem.model, chosen, 0.0, torch.float64, device, backend)
    return problem


def _problem(optimizer: str, backend: str, device: torch.device = META):
    if optimizer == "sgd":  # momentum, decay and clipping: every branch of the SGD step
        problem = make_problem(model=nn.Linear(4, 2).double() if backend == "linear" else None)
    else:
        problem = make_adam_problem("AdamW")
    return _on_device(problem, backend, device)


CASES = [("sgd", "linear"), ("sgd", "functional"), ("adam", "functional")]
METHODS = {"sgd": ("sgd-ie", "acc-sgd-ie"), "adam": ("adam-ie", "acc-adam-ie")}


@pytest.mark.parametrize("removal", ["exact", "first-order"])
@pytest.mark.parametrize("optimizer, backend", CASES)
def test_the_adjoint_step_loop_reads_no_device_value(optimizer, backend, removal):
    problem = _problem(optimizer, backend)
    rule = build_method(problem, METHODS[optimizer][0], removal=removal)
    gradient = torch.empty(rule.param_dim, dtype=torch.float64, device=META)
    result = adjoint_scores(rule, problem, gradient, progress=False)
    assert result.scores.device == META and result.scores.shape == (problem.num_samples,)


@pytest.mark.parametrize("schedule", ["sweep", "propagator"])
@pytest.mark.parametrize("accumulative", [False, True])
@pytest.mark.parametrize("optimizer, backend", CASES)
def test_the_forward_step_loops_read_no_device_value(optimizer, backend, accumulative, schedule):
    problem = _problem(optimizer, backend)
    rule = build_method(problem, METHODS[optimizer][accumulative], removal="exact")
    result = estimate_influence(problem, rule, every_occurrence(rule), schedule=schedule, progress=False)
    assert result.embeddings.device == META and result.embeddings.shape == (problem.num_samples, rule.param_dim)


def test_the_adjoint_probes_read_no_device_value():
    problem = _problem("sgd", "linear")
    rule = build_method(problem, "sgd-ie")
    tracker = ProbeGrowth(rule, 3, problem.trajectory.epoch.tolist(), device=META)
    for step in reversed(range(problem.trajectory.num_steps)):
        assert tracker.carried(step, rule.at_step(step).apply_adjoint(tracker.states)).device == META


def test_the_detector_catches_a_host_read(monkeypatch):
    """The meta device really refuses a host read inside the loop: a step that reads one value fails."""
    problem = _problem("sgd", "linear")
    rule = build_method(problem, "sgd-ie")
    apply_adjoint = SGDStep.apply_adjoint

    def reading(self, states):
        if float(states.norm()) > 0:  # the kind of branch a GPU would stall on
            pass
        return apply_adjoint(self, states)

    monkeypatch.setattr(SGDStep, "apply_adjoint", reading)
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        adjoint_scores(rule, problem, torch.empty(rule.param_dim, dtype=torch.float64, device=META), progress=False)


def _loop_under_sync_errors(rule, monkeypatch):
    """From the first step operator on, any synchronising CUDA call (a value read, a blocking copy) raises."""
    build = type(rule).at_step

    def at_step(self, step):
        torch.cuda.set_sync_debug_mode("error")
        return build(self, step)

    monkeypatch.setattr(type(rule), "at_step", at_step)


@pytest.mark.cuda
@pytest.mark.parametrize("optimizer, backend", CASES)
@pytest.mark.parametrize("form", ["adjoint", "sweep", "propagator"])
def test_on_a_gpu_the_step_loops_never_synchronise(optimizer, backend, form, monkeypatch):
    problem = _problem(optimizer, backend, torch.device("cuda"))
    rule = build_method(problem, METHODS[optimizer][form != "adjoint"], removal="exact")
    rule.at_step(0)  # the per-run device copies (learning rates, optimizer states) are made once, here
    gradient = torch.randn(rule.param_dim, dtype=torch.float64, device="cuda")
    try:
        _loop_under_sync_errors(rule, monkeypatch)
        if form == "adjoint":
            result = adjoint_scores(rule, problem, gradient, progress=False).scores
        else:
            result = estimate_influence(problem, rule, every_occurrence(rule), schedule=form, progress=False).embeddings
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result.is_cuda and bool(torch.isfinite(result).all())


def test_the_power_iteration_reads_no_device_value_inside_its_epochs():
    """The trust check of the forward form (tangent_growth) reads the device once per epoch boundary only: one
    epoch of a run on the meta device reaches the single read at the run's end."""
    from hf_accinf.engine.trust import tangent_growth

    problem = _problem("sgd", "linear")
    problem.trajectory.epoch.zero_()  # one epoch: the only host read is the final figure's
    rule = build_method(problem, "sgd-ie")
    with pytest.raises((RuntimeError, NotImplementedError), match="meta") as error:
        tangent_growth(rule, problem, probes=2, iterations=1, dtype=torch.float64, device=META)
    assert any(frame.name == "tangent_growth" and "float(log_scale)" in str(frame.statement)
               for frame in error.traceback), "a host read happened before the epoch's end"
