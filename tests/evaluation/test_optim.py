"""The functional optimizer steps (hf_accinf/evaluation/optim.py) against torch.optim: one step on the same
gradients (SGD momentum, Nesterov, Adam with L2, AdamW; clipping on), and whole recorded runs retrained with
every row kept (``retrain_sgd_without(..., ones)``), which must retrace the torch run that was recorded."""

import pytest
import torch

from hf_accinf.evaluation.optim import clip_gradients, optimizer_step
from hf_accinf.evaluation.retrain import retrain_sgd_without, train_recorded
from hf_accinf.problem import OptimizerSpec
from hf_accinf.trajectory.schema import ParamGroupSpec
from tests.engine.helpers import shuffled_batches, tiny_mlp
from tests.methods.helpers import warmup_linear

OPTIMIZERS = {  # name: (torch class, torch options, the ParamGroupSpec fields)
    "sgd-momentum": ("SGD", dict(momentum=0.9, weight_decay=0.01), dict(momentum=0.9, dampening=0.0, nesterov=False)),
    "sgd-nesterov": ("SGD", dict(momentum=0.8, weight_decay=0.01, nesterov=True), dict(momentum=0.8, dampening=0.0, nesterov=True)),
    "adam-l2": ("Adam", dict(weight_decay=0.05, betas=(0.8, 0.99), eps=1e-6), dict(betas=[0.8, 0.99], eps=1e-6, amsgrad=False)),
    "adamw": ("AdamW", dict(weight_decay=0.05, betas=(0.8, 0.99), eps=1e-6), dict(betas=[0.8, 0.99], eps=1e-6, amsgrad=False)),
}
STATE_KEYS = {"SGD": ("momentum_buffer",), "Adam": ("exp_avg", "exp_avg_sq"), "AdamW": ("exp_avg", "exp_avg_sq")}


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_one_functional_step_equals_torch_on_the_same_gradients(kind):
    name, options, fields = OPTIMIZERS[kind]
    generator = torch.Generator().manual_seed(0)
    params = {n: torch.randn(shape, generator=generator, dtype=torch.float64) for n, shape in (("w", (3, 4)), ("b", (3,)))}
    grads = [{n: torch.randn(p.shape, generator=generator, dtype=torch.float64) for n, p in params.items()} for _ in range(3)]
    tensors = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    torch_optimizer = getattr(torch.optim, name)(list(tensors.values()), lr=0.1, **options)
    spec = OptimizerSpec(name=name, groups=[ParamGroupSpec(index=0, weight_decay=options["weight_decay"], initial_lr=0.1,
                                                           **fields)],
                         group_of={n: 0 for n in params}, max_grad_norm=1.5)
    # Zero state before the first step: torch's first momentum buffer is the first direction, as mu * 0 + d.
    state = {f"{n}.{key}": torch.zeros_like(p) for n, p in params.items() for key in STATE_KEYS[name]}
    functional = dict(params)
    for count, step_grads in enumerate(grads):
        clipped, coef = clip_gradients(step_grads, spec.max_grad_norm)
        assert float(coef) < 1  # clipping binds
        for n, p in tensors.items():
            p.grad = clipped[n].clone()
        torch_optimizer.step()
        functional, state = optimizer_step(spec, functional, state, step_grads, {n: 0.1 for n in params}, count)
        for n, p in tensors.items():
            torch.testing.assert_close(functional[n], p.detach(), rtol=1e-12, atol=1e-14)
            for key in STATE_KEYS[name]:
                torch.testing.assert_close(state[f"{n}.{key}"], torch_optimizer.state[p][key], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_retraining_with_every_row_kept_retraces_the_recorded_torch_run(kind):
    """Clipping binds on some steps, learning rates warm up then decay, one row repeats, biases undecayed."""
    name, options, _ = OPTIMIZERS[kind]
    model = tiny_mlp(4, 3, 3, seed=1)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(12, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=generator)
    batches = shuffled_batches(12, 4, 3, seed=3)
    extra = {key: options[key] for key in ("momentum", "nesterov", "betas", "eps") if key in options}
    trajectory, spec = train_recorded(model, x, y, batches, warmup_linear(len(batches), 0.3), name,
                                      weight_decay=options["weight_decay"], max_grad_norm=0.8, no_decay=("bias",), **extra)
    assert (trajectory.clip_coef < 1).any() and (trajectory.clip_coef == 1).any()
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    kept = retrain_sgd_without(model, trajectory, spec, x, y, torch.ones(1, 12, dtype=torch.float64))
    for n, value in final.items():
        torch.testing.assert_close(kept[n][0], value, rtol=1e-10, atol=1e-13)
