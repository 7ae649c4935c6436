"""Scoring a recorded run end to end: the CLI quickstart, the written artifacts, and early refusals."""

import json

import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file

from hf_accinf import AccInfError, RunReader
from hf_accinf.cli import main
from hf_accinf.config import ScoreArguments
from hf_accinf.inputs.evaluation import head_inputs
from hf_accinf.examples import digits_dataset, synthetic_text_dataset, tiny_bert
from hf_accinf.scoring.objective import scores_from_embeddings
from hf_accinf.problem import problem_from_run
from hf_accinf.scoring import attribution_matrix, score_run
from tests.conftest import record_digits_run, record_run


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    run_dir, data = record_digits_run(out, 96)
    assert main(["score", "--run_dir", str(run_dir), "--modules", "head", *data]) == 0
    return run_dir


def test_quickstart_writes_scores_embeddings_and_a_score_column(quickstart):
    run = RunReader(quickstart)
    scores = load_file(quickstart / "scores" / "scores.safetensors")["scores"]
    embeddings = load_file(quickstart / "scores" / "embeddings.safetensors")
    assert scores.shape == (96,) and embeddings["weight"].shape == (96, 10, 64) and embeddings["bias"].shape == (96, 10)
    summary = json.loads((quickstart / "scores" / "scores.json").read_text())
    assert summary["most_harmful"][0] == int(scores.argmin())
    column = load_from_disk(str(quickstart / "scores" / "dataset"))[summary["column"]]
    torch.testing.assert_close(torch.tensor(column, dtype=torch.float64), scores)

    # The linear score is grad L_val(theta_T) . Delta^j_T: recompute the gradient with autograd.
    model = run.build_model()
    inputs, labels = head_inputs(model, "classifier", digits_dataset(400, seed=0, offset=96))
    final = run.head_parameters_at(run.num_steps)
    weight = final["weight"].double().requires_grad_(True)
    bias = final["bias"].double().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(inputs.double() @ weight.T + bias, labels)
    grad_w, grad_b = torch.autograd.grad(loss, (weight, bias))
    expected = (embeddings["weight"] * grad_w).sum((1, 2)) + embeddings["bias"] @ grad_b
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("backend", ["linear", "functional"])
def test_evaluated_scores_agree_with_linear_ones_to_first_order(quickstart, backend):
    """``L(theta + e D) - L(theta) = e grad L . D + O(e^2)``, for both curvature backends."""
    run = RunReader(quickstart)
    problem = problem_from_run(run, backend=backend)
    embeddings = problem.curvature.flatten_named(load_file(quickstart / "scores" / "embeddings.safetensors"))
    inputs, labels = head_inputs(run.build_model(), "classifier", digits_dataset(400, seed=0, offset=96))
    final = run.head_parameters_at(run.num_steps)
    linear = scores_from_embeddings(problem.curvature, embeddings, final, inputs, labels, "linear")
    errors = []
    for scale in (1e-1, 1e-2):
        evaluated = scores_from_embeddings(problem.curvature, scale * embeddings, final, inputs, labels, "evaluated")
        errors.append((evaluated - scale * linear).abs().max())
    assert errors[1] < errors[0] / 50  # the gap is second order


def test_other_training_data_is_refused_before_any_work(quickstart):
    with pytest.raises(AccInfError, match="has 95 rows but the run recorded 96"):
        score_run(ScoreArguments(run_dir=str(quickstart)), digits_dataset(95), digits_dataset(10, offset=96))
    with pytest.raises(AccInfError, match="rows differ from those the run was trained on"):
        score_run(ScoreArguments(run_dir=str(quickstart)), digits_dataset(96, seed=1), digits_dataset(10, offset=96))


def test_sgd_methods_refuse_an_adamw_run(tmp_run):
    data = synthetic_text_dataset(24)
    record_run(tiny_bert(), data, tmp_run)
    with pytest.raises(AccInfError, match="acc-sgd-ie models runs trained with SGD; this run used AdamW. Methods for this run: adam-ie, acc-adam-ie"):
        score_run(ScoreArguments(run_dir=str(tmp_run), method="acc-sgd-ie"), data, data)


def test_unknown_method_is_refused(quickstart):
    with pytest.raises(AccInfError, match="Unknown method 'acc-sdg-ie'"):
        score_run(ScoreArguments(run_dir=str(quickstart), method="acc-sdg-ie"), digits_dataset(96), digits_dataset(10, offset=96))


def test_attribution_matrix_averages_to_the_scores(quickstart):
    """Per-test-example attributions from saved embeddings; their mean over the test set is the score."""
    test = digits_dataset(400, seed=0, offset=96)
    matrix = attribution_matrix(str(quickstart), test)
    scores = load_file(quickstart / "scores" / "scores.safetensors")["scores"]
    assert matrix.shape == (400, 96)
    torch.testing.assert_close(matrix.mean(0), scores, rtol=1e-9, atol=1e-15)


def test_cli_scores_datasets_saved_to_disk(quickstart, tmp_path):
    """save_to_disk/load_from_disk changes a dataset's fingerprint but not its rows: the run accepts it."""
    digits_dataset(96).save_to_disk(str(tmp_path / "train"))
    digits_dataset(50, offset=96).save_to_disk(str(tmp_path / "eval"))
    assert main(["score", "--run_dir", str(quickstart), "--train_data", str(tmp_path / "train"),
                 "--eval_data", str(tmp_path / "eval"), "--output_dir", str(tmp_path / "scores")]) == 0
    assert (tmp_path / "scores" / "scores.safetensors").is_file()


def test_policy_options_without_their_policy_are_refused():
    with pytest.raises(ValueError, match="need correction='stage'"):
        ScoreArguments(stage_epochs=["0:1"])
    with pytest.raises(ValueError, match="needs correction='random'"):
        ScoreArguments(correction_p=0.5)
    with pytest.raises(ValueError, match="sgd-ie applies no correction"):
        ScoreArguments(method="sgd-ie", correction="random", correction_p=0.5)
