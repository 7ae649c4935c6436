"""Gauge tensors are found by their effect on the outputs, not by name.

Oracle: a tensor is gauge exactly when moving it (by a large random amount, in float64) leaves the
logits unchanged. Attention key biases are gauge in BERT (absolute positions) and ViT alike: the key
bias adds ``q_i . b`` to every key's score for query ``i``, a shift softmax ignores. Nothing else is.
"""

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

from hf_accinf.examples import digits_dataset, synthetic_text_dataset
from hf_accinf.trajectory.gauge import GAUGE_THRESHOLD, find_gauge, output_sensitivity


def tiny_bert_and_inputs():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, position_embedding_type="absolute")
    batch = synthetic_text_dataset(8, length=12)[:]
    mask = batch["attention_mask"].clone()
    mask[:3, 9:] = 0  # some padded rows: masked keys get the same shift, still ignored
    return BertForSequenceClassification(config), {"input_ids": batch["input_ids"], "attention_mask": mask}


def tiny_vit_and_inputs():
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=10)
    return ViTForImageClassification(config), {"pixel_values": digits_dataset(8)[:]["pixel_values"].double()}


def changes_outputs(model: nn.Module, inputs: dict, name: str) -> bool:
    """Whether moving parameter ``name`` by a random amount of the size of the largest parameter changes the
    logits beyond float64 rounding."""
    with torch.no_grad():
        before = model(**inputs).logits
        param = dict(model.named_parameters())[name]
        saved = param.clone()
        param.add_(torch.randn(param.shape, dtype=param.dtype, generator=torch.Generator().manual_seed(1)))
        after = model(**inputs).logits
        param.copy_(saved)
    return (after - before).abs().max().item() > 1e-10 * before.abs().max().item()


@pytest.mark.parametrize("build", [tiny_bert_and_inputs, tiny_vit_and_inputs], ids=["bert", "vit"])
def test_the_gauge_tensors_are_exactly_those_that_do_not_change_the_outputs(build):
    model, inputs = build()
    probe = copy.deepcopy(model).double().eval()
    gauge = find_gauge(probe, [(model.state_dict(), [inputs])])
    truth = tuple(name for name, _ in probe.named_parameters() if not changes_outputs(probe, inputs, name))
    assert gauge == truth
    assert len(gauge) == 2 and all(name.endswith(("key.bias", "k_proj.bias")) for name in gauge), gauge  # both layers
    share = output_sensitivity(probe, [(model.state_dict(), [inputs])])
    # A wide gap around the threshold: float64 rounding below, every tensor that matters far above.
    assert max(share[name] for name in gauge) < GAUGE_THRESHOLD * 1e-6
    assert min(value for name, value in share.items() if name not in gauge) > GAUGE_THRESHOLD * 1e2


class ZeroInitializedProduct(nn.Module):
    """``B (A x)`` with ``B = 0`` at initialization (as LoRA): ``A`` is inert there, not gauge."""

    def __init__(self):
        super().__init__()
        self.A = nn.Linear(4, 3, bias=False)
        self.B = nn.Linear(3, 2, bias=False)
        nn.init.zeros_(self.B.weight)

    def forward(self, x):
        return self.B(self.A(x))


def test_a_tensor_inert_at_one_point_only_is_not_gauge():
    torch.manual_seed(0)
    model = ZeroInitializedProduct().double()
    inputs = [{"x": torch.randn(5, 4, dtype=torch.float64)}]
    start = {name: value.clone() for name, value in model.state_dict().items()}
    trained = {**start, "B.weight": torch.randn(2, 3, dtype=torch.float64)}
    assert find_gauge(model, [(start, inputs)]) == ("A.weight",)
    assert find_gauge(model, [(start, inputs), (trained, inputs)]) == ()
