"""score_run and attribution_matrix on a scope outside the head: the objective goes through the whole model."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hf_accinf import AccInfError, RunReader
from hf_accinf.config import ScoreArguments
from hf_accinf.examples import synthetic_text_dataset
from hf_accinf.scoring import attribution_matrix, score_run
from tests.conftest import record_run
from tests.engine.test_deep_scope import tiny_model


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny-model ops are latency bound
    model, data = tiny_model("bert")
    run_dir = tmp_path_factory.mktemp("deep") / "run"
    record_run(model, data, run_dir, recording={"checkpoint_every": 1}, optim="sgd", optim_args="momentum=0.9",
               learning_rate=0.5, max_grad_norm=0.5, per_device_train_batch_size=3, num_train_epochs=2)
    evaluation = synthetic_text_dataset(5, length=6, seed=1)
    args = ScoreArguments(run_dir=str(run_dir), modules=["last:1"], method="acc-sgd-ie", dtype="float64")
    result = score_run(args, data, evaluation, progress=False)
    yield RunReader(run_dir), data, evaluation, result
    torch.set_num_threads(threads)


def autograd_gradients(run, names, evaluation, mean: bool) -> torch.Tensor:
    """Gradients of the evaluation losses w.r.t. the named parameters, through the whole model in eval mode."""
    model = run.build_model().double().eval()
    params = dict(model.named_parameters())
    batch = evaluation[:]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    targets = [losses.mean()] if mean else list(losses)
    rows = []
    for loss in targets:
        grads = torch.autograd.grad(loss, [params[name] for name in names], retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


def test_deep_scope_scores_are_the_whole_model_objective_gradient_dot_embeddings(scored):
    run, _, evaluation, result = scored
    out = result.output_dir
    embeddings = load_file(out / "embeddings.safetensors")
    with safe_open(str(out / "embeddings.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    names = json.loads(metadata["scope"])  # the model's parameter order
    assert metadata["backend"] == "model" and set(names) == set(embeddings)
    assert names[0].startswith("bert.encoder.layer.1.") and names[-1] == "classifier.bias"
    assert json.loads((out / "scores.json").read_text())["scope"] == names
    flat = torch.cat([embeddings[name].flatten(1) for name in names], 1)
    expected = flat @ autograd_gradients(run, names, evaluation, mean=True)[0]
    torch.testing.assert_close(result.scores, expected, rtol=1e-9, atol=1e-14)


def test_attribution_matrix_reads_the_deep_scope_back(scored):
    run, _, evaluation, result = scored
    matrix = attribution_matrix(str(run.run_dir), evaluation)
    embeddings = load_file(result.output_dir / "embeddings.safetensors")
    names = sorted(embeddings)  # any order, the same on both sides
    flat = torch.cat([embeddings[name].flatten(1) for name in names], 1)
    expected = autograd_gradients(run, names, evaluation, mean=False) @ flat.T
    torch.testing.assert_close(matrix, expected, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(matrix.mean(0), result.scores, rtol=1e-9, atol=1e-14)  # mean loss = mean of rows
    with pytest.raises(AccInfError, match="were scored for"):
        attribution_matrix(str(run.run_dir), evaluation, modules=["classifier"])
