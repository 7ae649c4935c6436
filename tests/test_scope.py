"""Scope resolution: names, globs, ``all`` and ``last:k`` on BERT, ViT and a custom ModuleList model; the
record-time head selection reads the same patterns."""

import pytest
from torch import nn

from hf_accinf.errors import AccInfError
from hf_accinf.examples import tiny_bert, tiny_vit
from hf_accinf.scope import describe_scopes, resolve_scope, select_head, transformer_blocks


class Stack(nn.Module):
    """A non-HF model: embedding, blocks in one ModuleList, a final norm and a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(3))
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 2)
        self.config = type("Config", (), {"num_labels": 2})()


def names(model):
    return [name for name, _ in model.named_parameters()]


@pytest.mark.parametrize("make, blocks", [(tiny_bert, "bert.encoder.layer"), (tiny_vit, "vit.layers"), (Stack, "blocks")])
def test_last_k_is_the_last_blocks_and_everything_after_them(make, blocks):
    model = make()
    name, module_list = transformer_blocks(model)
    assert name == blocks
    every = names(model)
    for k in range(1, len(module_list) + 1):
        scope = resolve_scope(model, [f"last:{k}"]).parameters
        first = every.index(next(n for n in every if n.startswith(f"{blocks}.{len(module_list) - k}.")))
        assert list(scope) == every[first:]
        assert not any(n.startswith(f"{blocks}.{len(module_list) - k - 1}.") for n in scope)
    assert list(resolve_scope(model, ["all"]).parameters) == every


def test_names_and_globs_resolve_in_model_order():
    model = tiny_bert()
    scope = resolve_scope(model, ["classifier", "bert.encoder.layer.0.output.*"]).parameters
    assert scope[-2:] == ("classifier.weight", "classifier.bias")
    assert all(n.startswith("bert.encoder.layer.0.output.") for n in scope[:-2]) and len(scope) == 6
    assert resolve_scope(model, None).parameters == ("classifier.weight", "classifier.bias")
    assert resolve_scope(model, ["weight"], head="classifier").parameters == ("classifier.weight",)
    assert resolve_scope(model, ["classifier"]).inside("classifier") == ("weight", "bias")
    assert resolve_scope(model, ["all"]).inside("classifier") is None


def test_unknown_modules_are_refused_listing_the_choices():
    model = tiny_vit()
    with pytest.raises(AccInfError, match=r"(?s)No module .* matches 'vit.encoder.layer'.*vit.layers.1.*last:2"):
        resolve_scope(model, ["vit.encoder.layer"])
    with pytest.raises(AccInfError, match="only 2 blocks"):
        resolve_scope(model, ["last:3"])
    with pytest.raises(AccInfError, match="last:k with k >= 1"):
        resolve_scope(model, ["last:x"])
    with pytest.raises(AccInfError, match="one nn.ModuleList"):
        resolve_scope(nn.Sequential(nn.Linear(2, 2)), ["last:1"])


def test_describe_scopes_lists_head_blocks_and_all_with_sizes():
    model = Stack()
    text = describe_scopes(model)
    total = sum(p.numel() for p in model.parameters())
    assert "out " in text and "last:3" in text and f"{total:,d}" in text
    assert f"{sum(p.numel() for p in model.out.parameters()):,d}" in text


class DeepHead(nn.Module):
    """A model whose classification head is a module of several layers."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
        self.config = type("Config", (), {"num_labels": 2})()


@pytest.mark.parametrize("patterns", [["head.*"], ["head.0", "head.2"], ["head.2.weight", "head.0*"]])
def test_record_time_selection_reads_the_score_time_patterns(patterns):
    model = DeepHead()
    scope, selection = resolve_scope(model, patterns), select_head(model, patterns)
    assert selection.head_name == "head" and selection.head is model.head
    assert scope.parameters == tuple(f"head.{name}" for name in selection.chosen_parameters)
    assert set(selection.chosen_parameters) <= {name for name, _ in model.head.named_parameters()}


def test_record_time_selection_defaults_to_the_classification_head_and_names_inside_it():
    model = tiny_bert()
    for patterns in (None, ["head"], ["classifier"]):
        selection = select_head(model, patterns)
        assert selection.head_name == "classifier" and selection.chosen_parameters == ("weight", "bias")
    assert select_head(model, ["weight"], head="classifier").chosen_parameters == ("weight",)


@pytest.mark.parametrize("patterns", [["all"], ["last:1"], ["bert.pooler", "classifier"]])
def test_record_time_selection_refuses_a_scope_no_head_module_holds(patterns):
    with pytest.raises(AccInfError, match="share no head module below the model itself"):
        select_head(tiny_bert(), patterns)
    with pytest.raises(AccInfError, match="not inside the head 'classifier'"):
        select_head(tiny_bert(), ["bert.pooler"], head="classifier")
