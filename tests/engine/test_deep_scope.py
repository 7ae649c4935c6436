"""The forward form on deep scopes (the last block and above, the whole model) against a naive oracle.

Tiny BERT and ViT classifiers are trained whole by the HF Trainer (SGD with momentum 0.9, weight decay on
the Trainer's decay group, clipping active on some steps, dropout off), recorded with a checkpoint at
every step. The oracle shares no code with the engine, the rules or the model backend: for one sample at a
time it reloads each step's checkpoint, collates the step's rows straight from the dataset, and
differentiates a functional torch-SGD step of the whole model (the Trainer's own optimizer groups give the
decay) with ``torch.func``, exactly as ``tests/engine/test_oracle.py`` does for small MLPs. Its attention is float64
throughout (HF's eager attention of ViT takes its softmax in float32: a float64 backend must not).
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, jvp, vmap
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

from hf_accinf import RunReader
from hf_accinf.errors import AccInfError
from hf_accinf.examples import digits_dataset, synthetic_text_dataset
from hf_accinf.curvature.model import ModelCurvature
from hf_accinf.problem import problem_from_run
from tests.conftest import record_run
from tests.engine.helpers import FLOAT64_ATTENTION, estimate

NUM_ROWS = 6


def tiny_model(kind: str):
    torch.manual_seed(0)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "bert":
        config = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=16, max_position_embeddings=16, num_labels=2, **no_dropout)
        return BertForSequenceClassification(config), synthetic_text_dataset(NUM_ROWS, length=6)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=8, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=16, num_labels=3, **no_dropout)
    return ViTForImageClassification(config), digits_dataset(NUM_ROWS, classes=(0, 1, 2))


@pytest.fixture(scope="module", params=["bert", "vit"])
def recorded(request, tmp_path_factory):
    model, data = tiny_model(request.param)
    run_dir = tmp_path_factory.mktemp(request.param) / "run"
    trainer = record_run(model, data, run_dir, recording={"checkpoint_every": 1}, optim="sgd", optim_args="momentum=0.9",
                         learning_rate=0.5, weight_decay=0.01, max_grad_norm=0.5, per_device_train_batch_size=3,
                         num_train_epochs=2)
    decay = {}
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    for group in trainer.optimizer.param_groups:
        decay.update({names[id(p)]: group["weight_decay"] for p in group["params"]})
    return request.param, RunReader(run_dir), data, decay


def oracle_embeddings(run: RunReader, data, decay: dict[str, float], scope: list[str], removal: str,
                      accumulative: bool) -> torch.Tensor:
    trajectory, manifest = run.trajectory(), run.manifest
    model = run.build_model().double().eval()
    model.set_attn_implementation(FLOAT64_ATTENTION)  # fused SDPA has no forward-mode derivative; eager ViT's is float32
    mu, max_norm = manifest.param_groups[0].momentum, manifest.training.max_grad_norm
    shapes = {name: p.shape for name, p in model.named_parameters() if name in scope}
    sizes = [s.numel() for s in shapes.values()]
    lam = torch.cat([torch.full((n,), decay[name], dtype=torch.float64) for name, n in zip(shapes, sizes)])

    def unflatten(flat):
        return {name: part.view(shape) for (name, shape), part in zip(shapes.items(), torch.split(flat, sizes))}

    steps = []
    for t in range(trajectory.num_steps):
        ids = trajectory.batch(t)
        rows = data[ids.tolist()]
        inputs = {k: v.double() if v.is_floating_point() else v for k, v in rows.items() if k != "labels"}
        checkpoint = {k: v.double() for k, v in run.load_checkpoint(t).items() if k in dict(model.named_parameters())}
        theta = torch.cat([checkpoint[name].flatten() for name in shapes])
        fixed = {k: v for k, v in checkpoint.items() if k not in shapes}
        steps.append((ids, inputs, rows["labels"], fixed, theta, trajectory.row_weight[trajectory.rows_of(t)].clone(),
                      float(trajectory.lr[t, 0]), float(trajectory.grad_norm[t])))

    deltas = torch.zeros(NUM_ROWS, 2 * sum(sizes), dtype=torch.float64)
    for ids, inputs, labels, fixed, theta, w, lr, recorded_norm in steps:
        def loss(flat, weights):
            logits = functional_call(model, {**fixed, **unflatten(flat)}, (), inputs).logits
            return (weights * torch.nn.functional.cross_entropy(logits, labels, reduction="none")).sum()

        g_full = grad(loss)(theta, w)
        rest = max(recorded_norm**2 - float(g_full @ g_full), 0.0)

        def step(s, weights):
            th, bu = s[: len(theta)], s[len(theta):]
            g = grad(loss)(th, weights)
            norm = torch.sqrt(rest + (g * g).sum())
            g = torch.clamp(max_norm / (norm + 1e-6), max=1.0) * g
            new_buf = mu * bu + g + lam * th
            return torch.cat([th - lr * new_buf, new_buf])

        state = torch.cat([theta, torch.zeros_like(theta)])
        absent = [j for j in range(NUM_ROWS) if not bool((ids == j).any())]
        # Samples not in the batch share the plain transition (vmapped over them only to save time).
        deltas[absent] = vmap(lambda d: jvp(lambda s: step(s, w), (state,), (d,))[1])(deltas[absent])
        for j in set(ids.tolist()):
            w_removed = torch.where(ids == j, torch.zeros_like(w), w)
            previous, direction = deltas[j].clone(), w_removed - w
            if removal == "exact":
                transition = w_removed if accumulative else w
                deltas[j] = jvp(lambda s: step(s, transition), (state,), (previous,))[1] + step(state, w_removed) - step(state, w)
                continue
            deltas[j] = (jvp(lambda s: step(s, w), (state,), (previous,))[1]
                         + jvp(lambda v: step(state, v), (w,), (direction,))[1])
            if accumulative:
                deltas[j] += jvp(lambda e: jvp(lambda s: step(s, w + e * direction), (state,), (previous,))[1],
                                 (torch.zeros((), dtype=torch.float64),), (torch.ones((), dtype=torch.float64),))[1]
    return deltas[:, : sum(sizes)]


# Every (removal, method) pair runs on two of the four (model, scope) cases: the oracle is the slow part.
CASES = {
    ("bert", "last:1"): [("first-order", "acc-sgd-ie"), ("exact", "sgd-ie")],
    ("bert", "all"): [("exact", "acc-sgd-ie"), ("first-order", "sgd-ie")],
    ("vit", "last:1"): [("exact", "acc-sgd-ie"), ("first-order", "sgd-ie")],
    ("vit", "all"): [("first-order", "acc-sgd-ie"), ("exact", "sgd-ie")],
}


@pytest.mark.parametrize("scope_name", ["last:1", "all"])
def test_deep_scope_forward_form_matches_the_naive_oracle(recorded, scope_name):
    kind, run, data, decay = recorded
    trajectory = run.trajectory()
    assert (trajectory.clip_coef < 1).any() and (trajectory.clip_coef == 1).any()
    problem = problem_from_run(run, modules=[scope_name], train_dataset=data)
    assert problem.optimizer.groups[0].momentum == 0.9 and isinstance(problem.curvature, ModelCurvature)
    scope = list(problem.scope.parameters)
    assert scope[-1] == "classifier.bias" and any(".layers.1." in name or ".layer.1." in name for name in scope)
    assert (scope_name == "all") == any("embeddings" in name for name in scope)
    for removal, method in CASES[kind, scope_name]:
        expected = oracle_embeddings(run, data, decay, scope, removal, method == "acc-sgd-ie")
        result = estimate(problem, method, removal, schedule="auto", progress=False)
        assert result.schedule == "sweep"
        torch.testing.assert_close(result.embeddings, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))
    # BERT too is vmapped over single rows (its padding mask handed over in 4D additive form).
    assert problem.curvature.per_row == "vmap"


def test_propagator_is_refused_when_its_matrices_exceed_the_budget(recorded):
    _, run, data, _ = recorded
    problem = problem_from_run(run, modules=["all"], train_dataset=data)
    with pytest.raises(AccInfError, match="S x S matrices.*--schedule sweep"):
        estimate(problem, "sgd-ie", schedule="propagator", memory_budget_gb=1e-3, progress=False)


def test_deep_scope_needs_the_training_dataset(recorded):
    _, run, _, _ = recorded
    with pytest.raises(AccInfError, match="pass the training dataset"):
        problem_from_run(run, modules=["last:1"])
