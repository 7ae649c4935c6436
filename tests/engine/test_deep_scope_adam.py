"""Adam-IE and ACC-Adam-IE on deep scopes of real HF runs (the README's whole-model path) against a naive oracle.

Tiny BERT and ViT classifiers are trained whole by the HF Trainer with its default optimizer recipe (AdamW,
linear warm-up then linear decay, clipping at 1.0 active on some steps only, weight decay 0.01 on the
Trainer's decay group, dropout off) and recorded with a checkpoint, optimizer state included, at every step.
The oracle shares no code with the engine, the rules, replay or the model backend: per sample and per step
it reloads the step's parameters and Adam moments from the checkpoint files, collates the step's rows
straight from the dataset, and differentiates the functional AdamW step of the whole model
(:func:`hf_accinf.evaluation.optim.optimizer_step`, itself checked against ``torch.optim.AdamW``) with
``torch.func.jvp`` (DESIGN.md section 4: exact and first-order removal, the classical and the ACC twin).

Every parameter of the scope gets a gradient at the first step (each text row holds every token of the
vocabulary, no padding row, one token type), so Adam's ``sqrt(v')`` is differentiable in the oracle, except for
the attention key biases: softmax is shift invariant, their gradient is identically zero (numerically 0 or
rounding noise) and their step is 0/0 at ``v' = 0``. Their mixed second derivatives vanish too, so the oracle
holds them at their recorded values, compares every other coordinate, and asks the engine's key-bias tangents to
be negligible. The oracle's attention computes in float64 throughout: HF's eager attention of ViT takes its
softmax in float32, an error of about 1e-6 relative that Adam's step passes on (a float64 backend must not).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from torch.func import functional_call, grad, jvp, vmap
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

from hf_accinf import RunReader, ScoreArguments, score_run
from hf_accinf.errors import AccInfError
from hf_accinf.evaluation.optim import optimizer_step
from hf_accinf.examples import digits_dataset
from hf_accinf.problem import problem_from_run
from hf_accinf.trajectory.replay import Replay
from tests.conftest import record_run
from tests.engine.helpers import FLOAT64_ATTENTION, estimate, oracle_occurrence

NUM_ROWS = 6
VOCAB = 6
# The HF default recipe at a learning rate where clipping at 1.0 binds on some steps and not on others.
ADAMW_RECIPE = dict(learning_rate=0.03, warmup_steps=0.2, lr_scheduler_type="linear", max_grad_norm=1.0,
                    weight_decay=0.01, per_device_train_batch_size=3, num_train_epochs=3)


def every_token_dataset(num_rows: int, seed: int) -> Dataset:
    """Rows that are permutations of the whole vocabulary, random labels."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(VOCAB, generator=generator) for _ in range(num_rows)])
    labels = torch.randint(0, 2, (num_rows,), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": labels.tolist()}).with_format("torch")


def tiny_model(kind: str, eval_rows: int = 0):
    torch.manual_seed(0)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "bert":
        config = BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=16, max_position_embeddings=VOCAB, type_vocab_size=1, pad_token_id=None,
                            num_labels=2, **no_dropout)
        return BertForSequenceClassification(config), every_token_dataset(NUM_ROWS, 0), every_token_dataset(eval_rows or 4, 1)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=8, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=16, num_labels=3, **no_dropout)
    return (ViTForImageClassification(config), digits_dataset(NUM_ROWS, classes=(0, 1, 2)),
            digits_dataset(eval_rows or 4, classes=(0, 1, 2), offset=NUM_ROWS))


@pytest.fixture(scope="module", params=["bert", "vit"])
def recorded(request, tmp_path_factory):
    model, data, held_out = tiny_model(request.param)
    run_dir = tmp_path_factory.mktemp(f"adam-{request.param}") / "run"
    trainer = record_run(model, data, run_dir, recording={"checkpoint_every": 1}, **ADAMW_RECIPE)
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    groups = [SimpleNamespace(weight_decay=g["weight_decay"], betas=tuple(g["betas"]), eps=g["eps"])
              for g in trainer.optimizer.param_groups]
    group_of = {names[id(p)]: index for index, g in enumerate(trainer.optimizer.param_groups) for p in g["params"]}
    assert type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer).__name__ == "AdamW"
    assert {g.weight_decay for g in groups} == {0.01, 0.0}
    return request.param, RunReader(run_dir), data, held_out, (groups, group_of)


def oracle_embeddings(run: RunReader, data, optimizer, scope: list[str], removal: str,
                      accumulative: bool) -> torch.Tensor:
    """Per sample, the tangent ``(Delta theta, Delta m, Delta v)`` of the whole run by ``jvp`` of each step."""
    groups, group_of = optimizer
    trajectory, manifest = run.trajectory(), run.manifest
    model = run.build_model().double().eval()
    model.set_attn_implementation(FLOAT64_ATTENTION)  # fused SDPA has no forward-mode derivative
    spec = SimpleNamespace(name="AdamW", groups=groups, group_of=group_of,
                           max_grad_norm=manifest.training.max_grad_norm)
    shapes = {name: p.shape for name, p in model.named_parameters() if name in scope and not is_key_bias(name)}
    sizes = [s.numel() for s in shapes.values()]
    size = sum(sizes)
    model_names = dict(model.named_parameters())

    def unflatten(flat):
        return {name: part.view(shape) for (name, shape), part in zip(shapes.items(), torch.split(flat, sizes))}

    def flatten(named):
        return torch.cat([named[name].flatten() for name in shapes])

    deltas = torch.zeros(NUM_ROWS, 3 * size, dtype=torch.float64)
    for t in range(trajectory.num_steps):
        ids = trajectory.batch(t)
        rows = data[ids.tolist()]
        inputs = {k: v.double() if v.is_floating_point() else v for k, v in rows.items() if k != "labels"}
        checkpoint = {k: v.double() for k, v in run.load_checkpoint(t).items() if k in model_names}
        moments, _ = run.load_optimizer_state(t)
        if t > 0:  # torch initializes the moments at the first step: before it they are zero
            assert all(int(moments[f"{name}::step"]) == t for name in shapes)

        def moment(name, key):
            value = moments.get(f"{name}::{key}")
            return torch.zeros(shapes[name], dtype=torch.float64) if value is None else value.double()

        state = torch.cat([flatten(checkpoint), flatten({n: moment(n, "exp_avg") for n in shapes}),
                           flatten({n: moment(n, "exp_avg_sq") for n in shapes})])
        fixed = {k: v for k, v in checkpoint.items() if k not in shapes}
        w = trajectory.row_weight[trajectory.rows_of(t)].clone()
        lrs = {name: float(trajectory.lr[t, group_of[name]]) for name in shapes}
        labels = rows["labels"]

        def loss(params, weights):
            logits = functional_call(model, {**fixed, **params}, (), inputs).logits
            return (weights * torch.nn.functional.cross_entropy(logits, labels, reduction="none")).sum()

        g_scope = flatten(grad(loss)(unflatten(state[:size]), w))
        rest = max(float(trajectory.grad_norm[t]) ** 2 - float(g_scope @ g_scope), 0.0)

        def step(s, weights):
            theta = unflatten(s[:size])
            adam = {**{f"{n}.exp_avg": m for n, m in unflatten(s[size : 2 * size]).items()},
                    **{f"{n}.exp_avg_sq": v for n, v in unflatten(s[2 * size :]).items()}}
            params, new = optimizer_step(spec, theta, adam, grad(loss)(theta, weights), lrs, t, rest)
            return torch.cat([flatten(params), flatten({n: new[f"{n}.exp_avg"] for n in shapes}),
                              flatten({n: new[f"{n}.exp_avg_sq"] for n in shapes})])

        absent = [j for j in range(NUM_ROWS) if not bool((ids == j).any())]
        # Samples not in the batch share the plain transition (vmapped over them only to save time).
        deltas[absent] = vmap(lambda d: jvp(lambda s: step(s, w), (state,), (d,))[1])(deltas[absent])
        for j in set(ids.tolist()):
            deltas[j] = oracle_occurrence(step, state, deltas[j].clone(), w, ids, j, float(accumulative), removal)
    return deltas[:, :size]


def is_key_bias(name: str) -> bool:
    return name.endswith(("key.bias", "k_proj.bias"))


# Every (removal, method) pair runs on each model's last block; the whole model (the slow part of the oracle) runs
# the README's adam-ie with exact removal on BERT and acc-adam-ie with first-order removal on ViT.
CASES = {
    ("bert", "last:1"): [("first-order", "acc-adam-ie"), ("exact", "adam-ie")],
    ("bert", "all"): [("exact", "adam-ie")],
    ("vit", "last:1"): [("exact", "acc-adam-ie"), ("first-order", "adam-ie")],
    ("vit", "all"): [("first-order", "acc-adam-ie")],
}


@pytest.mark.parametrize("scope_name", ["last:1", "all"])
def test_adam_deep_scope_forward_form_matches_the_naive_oracle(recorded, scope_name):
    kind, run, data, _, optimizer = recorded
    trajectory = run.trajectory()
    assert (trajectory.clip_coef < 1).any() and (trajectory.clip_coef == 1).any()
    assert trajectory.lr[0, 0] == 0 and trajectory.lr[1, 0] > trajectory.lr[-1, 0] > 0  # warm-up, then decay
    problem = problem_from_run(run, modules=[scope_name], train_dataset=data)
    scope = list(problem.scope.parameters)
    assert scope[-1] == "classifier.bias" and any(".layers.1." in name or ".layer.1." in name for name in scope)
    assert (scope_name == "all") == any("embeddings" in name for name in scope)
    named = dict(run.build_model().named_parameters())
    for removal, method in CASES[kind, scope_name]:
        expected = oracle_embeddings(run, data, optimizer, scope, removal, method == "acc-adam-ie")
        result = estimate(problem, method, removal, schedule="sweep", progress=False)
        sizes = [named[name].numel() for name in scope]
        parts = dict(zip(scope, torch.split(result.embeddings, sizes, dim=1)))
        compared = torch.cat([part for name, part in parts.items() if not is_key_bias(name)], dim=1)
        scale = float(expected.abs().max())
        torch.testing.assert_close(compared, expected, rtol=1e-8, atol=1e-10 * scale)
        for name, part in parts.items():
            if is_key_bias(name):
                assert float(part.abs().max()) <= 1e-6 * scale, name


@pytest.mark.parametrize("removal", ["exact", "first-order"])
def test_adam_ie_whole_model_adjoint_equals_forward(recorded, removal, tmp_path):
    """The README's faithful command, ``--method adam-ie --modules all --form adjoint``: one backward pass
    gives the scores of the per-row forward form."""
    _, run, data, held_out, _ = recorded
    scores = {}
    for form in ("forward", "adjoint"):
        args = ScoreArguments(run_dir=str(run.run_dir), method="adam-ie", removal=removal, modules=["all"], form=form,
                              dtype="float64",
                              trust_probes=0, output_dir=str(tmp_path / form))
        result = score_run(args, data, held_out, progress=False)
        assert result.form == form
        scores[form] = result.scores
    assert scores["forward"].abs().max() > 0
    torch.testing.assert_close(scores["adjoint"], scores["forward"], rtol=1e-9,
                               atol=1e-12 * float(scores["forward"].abs().max()))


class MissingMoment:
    """Replay whose optimizer state lost ``exp_avg_sq`` of one parameter after the first step."""

    def __init__(self, replay: Replay, name: str):
        self.replay, self.name = replay, name

    def __getattr__(self, attribute):
        return getattr(self.replay, attribute)

    def optimizer_state_at(self, step: int):
        state = self.replay.optimizer_state_at(step)
        if step > 0:
            state[self.name].pop("exp_avg_sq")
        return state


def test_a_missing_adam_moment_is_refused_not_read_as_zero(recorded):
    """Before the first step Adam's moments are legitimately absent (zero); after it, a missing moment
    from the state provider is a damaged state: refused, or read correctly, never silently zero."""
    _, run, data, _, _ = recorded
    states = MissingMoment(Replay(run, data), "classifier.weight")
    problem = problem_from_run(run, modules=["last:1"], train_dataset=data, states=states)
    with pytest.raises(AccInfError, match="exp_avg_sq"):
        estimate(problem, "adam-ie", schedule="sweep", progress=False)
