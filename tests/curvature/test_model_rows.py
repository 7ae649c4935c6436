"""The model backend's per-row quantities (vmap over single rows, DESIGN.md section 6b) against plain autograd.

One step of six rows in two micro-batches collated separately (BERT's padded to different lengths), with
per-row loss weights, label smoothing, rows of the step in shuffled order across the micro-batches, at a
random parameter point of tiny BERT and ViT classifiers built from configs. The oracle loops over the rows
with ``torch.autograd`` on the model itself (its own 2D padding masks, ``F.cross_entropy`` with
``label_smoothing``): per-row gradients, per-row ``H_r v_r`` by double backward, the batch gradient and
``H_B v``. The row loss tangents are checked against ``g_r . v`` (the directional derivative).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

from hf_accinf.curvature.attention import EXACT_ATTENTION
from hf_accinf.curvature import memory
from hf_accinf.curvature.model import ModelCurvature
from hf_accinf.errors import AccInfError
from hf_accinf.scope import resolve_scope

SMOOTHING = 0.1
# step positions of the rows in each micro-batch (a shuffled split of the step's six rows)
MICRO_POSITIONS = (torch.tensor([4, 0, 2]), torch.tensor([1, 5, 3]))
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class OneStep:
    """A one-step trajectory and its states: what :class:`ModelCurvature` reads of a run."""

    def __init__(self, model: nn.Module, inputs: list[dict[str, torch.Tensor]], labels: torch.Tensor):
        generator = torch.Generator().manual_seed(1)
        self.params = {name: value.detach().clone() for name, value in model.state_dict().items()}
        self.inputs, self.labels = inputs, labels
        self.row_weight = torch.rand(len(labels), generator=generator, dtype=torch.float64) + 0.1

    def rows_of(self, step: int) -> slice:
        return slice(0, len(self.labels))

    def parameters_at(self, step: int) -> dict[str, torch.Tensor]:
        return self.params

    def batch_inputs(self, step: int):
        return list(zip(self.inputs, MICRO_POSITIONS))


def bert_case(is_decoder: bool = False):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                        max_position_embeddings=16, num_labels=3, is_decoder=is_decoder, **NO_DROPOUT)
    model = BertForSequenceClassification(config)
    lengths = torch.tensor([7, 3, 5, 6, 2, 4])  # micro-batch rows 4,0,2 -> 7 columns; 1,5,3 -> 6 columns
    micros = []
    for where in MICRO_POSITIONS:
        width = int(lengths[where].max())
        mask = (torch.arange(width)[None] < lengths[where][:, None]).long()
        ids = torch.randint(1, 40, (len(where), width)) * mask
        micros.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    return model, OneStep(model, micros, torch.tensor([0, 2, 1, 1, 0, 2]))


def vit_case():
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=8, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=16, num_labels=3, **NO_DROPOUT)
    model = ViTForImageClassification(config)
    with torch.no_grad():  # ViT initializes these to zero: give their per-row gradients something to act on
        model.vit.embeddings.cls_token.normal_()
        model.vit.embeddings.position_embeddings.normal_()
    micros = [{"pixel_values": torch.randn(len(where), 1, 8, 8)} for where in MICRO_POSITIONS]
    return model, OneStep(model, micros, torch.tensor([0, 2, 1, 1, 0, 2]))


CASES = {"bert": bert_case, "vit": vit_case}


def curvature(model, step: OneStep, patterns: list[str], **options) -> ModelCurvature:
    names = list(resolve_scope(model, patterns, head="classifier").parameters)
    return ModelCurvature(step, model, names, step, SMOOTHING, **options)


def autograd_oracle(model: nn.Module, step: OneStep, names: list[str], vectors: torch.Tensor, dtype=torch.float64):
    """Per-row gradients, per-row ``H_r v_r``, the batch gradient and ``H_B v_k``, one row at a time."""
    model = model.to(dtype).eval()
    model.set_attn_implementation(EXACT_ATTENTION)  # fused SDPA has no double backward; eager softmax is float32
    params = dict(model.named_parameters())
    chosen = [params[name] for name in names]
    vectors = vectors.to(dtype)

    def flat_grad(loss, **options):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, chosen, **options)])

    row_grads, row_hvps = [None] * len(step.labels), [None] * len(step.labels)
    batch_grad, batch_hvps = 0, 0
    for inputs, where in step.batch_inputs(0):
        for local, row in enumerate(where.tolist()):
            row_inputs = {k: v[local:local + 1].to(dtype) if v.is_floating_point() else v[local:local + 1]
                          for k, v in inputs.items()}
            loss = nn.functional.cross_entropy(model(**row_inputs).logits, step.labels[row:row + 1],
                                               label_smoothing=SMOOTHING)
            gradient = flat_grad(loss, create_graph=True)
            row_grads[row] = gradient.detach()
            row_hvps[row] = flat_grad(gradient @ vectors[row], retain_graph=True)
            hessian = torch.stack([flat_grad(gradient @ v, retain_graph=True) for v in vectors])
            batch_grad = batch_grad + step.row_weight[row].to(dtype) * gradient.detach()
            batch_hvps = batch_hvps + step.row_weight[row].to(dtype) * hessian
    return torch.stack(row_grads), torch.stack(row_hvps), batch_grad, batch_hvps


def random_vectors(count: int, dim: int) -> torch.Tensor:
    return torch.randn(count, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["bert", "vit"])
@pytest.mark.parametrize("scope", ["all", "last:1", "classifier"])
def test_per_row_quantities_equal_autograd(kind, scope):
    model, step = CASES[kind]()
    backend = curvature(model, step, [scope])
    batch = backend.at_step(0)
    vectors = random_vectors(len(step.labels), backend.dim)
    grads, row_hvps, batch_grad, batch_hvps = autograd_oracle(model, step, backend.chosen, vectors)
    rows = torch.arange(len(step.labels))
    exact = dict(rtol=1e-10, atol=1e-12 * float(grads.abs().max()))
    torch.testing.assert_close(batch.row_grads(rows), grads, **exact)
    assert backend.per_row == "vmap"  # BERT included: its padding mask is handed over in 4D additive form
    assert backend.additive_mask is (True if kind == "bert" else None)
    shuffled = torch.tensor([3, 0, 5, 1])
    torch.testing.assert_close(batch.row_grads(shuffled), grads[shuffled], **exact)
    torch.testing.assert_close(batch.batch_grad, batch_grad, **exact)
    # Forward-over-reverse and double backward round differently through LayerNorm: ~1e-10 of the scale.
    curved = dict(rtol=1e-8, atol=1e-9 * float(row_hvps.abs().max()))
    torch.testing.assert_close(batch.row_hvp(vectors[shuffled], shuffled), row_hvps[shuffled], **curved)
    torch.testing.assert_close(batch.hvp(vectors), batch_hvps, **curved)
    tangent = vectors[0]
    torch.testing.assert_close(batch.row_loss_tangents(tangent), grads @ tangent, rtol=1e-10,
                               atol=1e-12 * float((grads.abs() @ tangent.abs()).max()))


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_blocks_and_chunks_under_a_tiny_budget_equal_one_pass(kind, monkeypatch):
    model, step = CASES[kind]()
    whole = curvature(model, step, ["all"])
    reference = whole.at_step(0)
    vectors = random_vectors(len(step.labels), whole.dim)
    rows = torch.arange(len(step.labels))
    shifts = 1e-2 * vectors
    expected = (reference.row_grads(rows), reference.row_hvp(vectors, rows), reference.batch_grad,
                reference.hvp(vectors), reference.row_loss_tangents(vectors[0]), reference.shifted_batch_losses(shifts))
    plans = []
    original = memory.plan_block
    monkeypatch.setattr(memory, "plan_block", lambda *args, **kw: plans.append(original(*args, **kw)) or plans[-1])
    # the least memory in which one row of every quantity fits: one row and one vector per block
    row_bytes, scope_bytes = max(whole._row_bytes.values()), whole.dim * 8
    needs = [cost.bytes(1, 1, row_bytes, scope_bytes) for cost in (memory.BATCH_GRAD, memory.ROW_GRADS, memory.ROW_HVP,
                                                                   memory.ROW_TANGENTS, memory.BATCH_HVP,
                                                                   memory.SHIFTED_LOSSES)]
    tiny = curvature(model, step, ["all"], memory_budget=int(max(needs)) + 1)
    batch = tiny.at_step(0)
    actual = (batch.row_grads(rows), batch.row_hvp(vectors, rows), batch.batch_grad, batch.hvp(vectors),
              batch.row_loss_tangents(vectors[0]), batch.shifted_batch_losses(shifts))
    assert plans and min(rows for rows, _ in plans) == 1 and min(chunk for _, chunk in plans) == 1
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13 * float(want.abs().max()))


def test_a_budget_below_one_row_is_refused_before_work():
    model, step = bert_case()
    batch = curvature(model, step, ["all"], memory_budget=1000).at_step(0)
    with pytest.raises(AccInfError, match="memory_budget=1000 bytes cannot hold per-row gradients.*--memory_budget_gb"):
        batch.row_grads(torch.arange(2))


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_float32_per_row_quantities(kind):
    model, step = CASES[kind]()
    backend = curvature(model, step, ["all"], dtype=torch.float32)
    batch = backend.at_step(0)
    vectors = random_vectors(len(step.labels), backend.dim)
    grads, row_hvps, batch_grad, batch_hvps = autograd_oracle(model, step, backend.chosen, vectors)
    rows = torch.arange(len(step.labels))
    computed = (batch.row_grads(rows), batch.row_hvp(vectors.float(), rows), batch.batch_grad, batch.hvp(vectors.float()))
    for got, want in zip(computed, (grads, row_hvps, batch_grad, batch_hvps)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_a_causal_model_keeps_its_2d_mask():
    """A decoder builds a causal mask from the 2D one: the 4D bidirectional form would change its logits."""
    model, step = bert_case(is_decoder=True)
    backend = curvature(model, step, ["last:1"])
    batch = backend.at_step(0)
    vectors = random_vectors(len(step.labels), backend.dim)
    grads, row_hvps, _, _ = autograd_oracle(model, step, backend.chosen, vectors)
    rows = torch.arange(len(step.labels))
    torch.testing.assert_close(batch.row_grads(rows), grads, rtol=1e-10, atol=1e-12 * float(grads.abs().max()))
    assert backend.additive_mask is False
    torch.testing.assert_close(batch.row_hvp(vectors, rows), row_hvps, rtol=1e-8, atol=1e-9 * float(row_hvps.abs().max()))


class DataDependent(nn.Module):
    """A classifier whose forward branches on its input's values (a check that always holds, so rows stay
    independent): vmap over rows refuses it."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Linear(4, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(features).all()):
            raise ValueError("non-finite features")
        return self.classifier(features)


def test_a_model_vmap_refuses_falls_back_to_loss_weights_with_a_clean_sentence(caplog):
    torch.manual_seed(0)
    model = DataDependent().double()
    step = OneStep(model, [{"features": torch.randn(len(where), 4, dtype=torch.float64)} for where in MICRO_POSITIONS],
                   torch.tensor([0, 2, 1, 1, 0, 2]))
    backend = curvature(model, step, ["all"])
    batch = backend.at_step(0)
    rows = torch.arange(len(step.labels))
    expected = []
    for inputs, where in step.batch_inputs(0):
        for local in range(len(where)):
            loss = nn.functional.cross_entropy(model(inputs["features"][local:local + 1]), step.labels[where[local:local + 1]],
                                               label_smoothing=SMOOTHING)
            expected.append((int(where[local]), torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])))
    expected = torch.stack([gradient for _, gradient in sorted(expected, key=lambda pair: pair[0])])
    with caplog.at_level(logging.INFO, logger="hf_accinf.curvature.model"):
        torch.testing.assert_close(batch.row_grads(rows), expected, rtol=1e-10, atol=1e-14)
    assert backend.per_row == "weights"
    assert [record.getMessage() for record in caplog.records] == [
        "Per-row quantities by per-row loss weights: DataDependent cannot be vmapped over single rows (RuntimeError)."]


class MaskedMean(nn.Module):
    """Mean of token embeddings over the positions its 2D mask keeps: a 4D mask cannot stand in for it."""

    def __init__(self):
        super().__init__()
        self.embedding, self.classifier = nn.Embedding(40, 4), nn.Linear(4, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kept = attention_mask[..., None].to(self.embedding.weight.dtype)
        return self.classifier((self.embedding(input_ids) * kept).sum(1) / kept.sum(1))


def test_a_model_that_reads_its_2d_mask_itself_keeps_it():
    torch.manual_seed(0)
    model = MaskedMean().double()
    _, reference = bert_case()
    inputs = [{key: micro[key] for key in ("input_ids", "attention_mask")} for micro in reference.inputs]
    step = OneStep(model, inputs, reference.labels)
    backend = curvature(model, step, ["all"])
    batch = backend.at_step(0)
    rows = torch.arange(len(step.labels))
    expected = torch.zeros(len(rows), backend.dim, dtype=torch.float64)
    for micro, where in step.batch_inputs(0):
        for local, row in enumerate(where.tolist()):
            logits = model(micro["input_ids"][local:local + 1], micro["attention_mask"][local:local + 1])
            loss = nn.functional.cross_entropy(logits, step.labels[row:row + 1], label_smoothing=SMOOTHING)
            expected[row] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])
    torch.testing.assert_close(batch.row_grads(rows), expected, rtol=1e-10, atol=1e-14)
    assert backend.additive_mask is False and backend.per_row == "vmap"
