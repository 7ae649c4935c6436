"""Scoring's numerical paths that the defaults take at scale or on other runs: float32 propagation, samples in
chunks under the memory budget, a run trained without clipping, and trajectories with a non-finite loss or gradient."""

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_accinf import AccInfError, RunReader, ScoreArguments, score_run
from hf_accinf.engine import CorrectionPolicy, estimate_influence
from hf_accinf.methods.registry import build_method
from hf_accinf.examples import digits_dataset, tiny_vit
from tests.conftest import record_run
from tests.engine.helpers import make_problem
from tests.methods.helpers import make_adam_problem

TRAIN, EVAL = dict(num_rows=48), dict(num_rows=20, offset=48)


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory):
    """The HF default recipe (AdamW, warm-up, linear decay, clipping at 1.0) on a tiny ViT, 6 steps."""
    run_dir = tmp_path_factory.mktemp("numerics") / "run"
    record_run(tiny_vit(hidden_size=16), digits_dataset(**TRAIN), run_dir, learning_rate=1e-3, warmup_steps=0.2,
               per_device_train_batch_size=16, num_train_epochs=2)
    return run_dir


def _score(run_dir, out, **options):
    args = ScoreArguments(run_dir=str(run_dir), output_dir=str(out), trust_probes=0, **options)
    return score_run(args, digits_dataset(**TRAIN), digits_dataset(**EVAL), progress=False)


@pytest.mark.parametrize("method", ["acc-adam-ie", "adam-ie"])
def test_float32_scores_agree_with_float64(adamw_run, tmp_path, method):
    """float32 carries 24 bits (about 6e-8 relative per operation); over 6 steps the scores must agree to 1e-4
    of the score vector's norm."""
    double = _score(adamw_run, tmp_path / "f64", method=method, dtype="float64")
    single = _score(adamw_run, tmp_path / "f32", method=method, dtype="float32")
    assert double.scores.norm() > 0
    assert float((single.scores.double() - double.scores).norm()) <= 1e-4 * float(double.scores.norm())
    assert not torch.equal(single.scores.double(), double.scores)  # float32 really ran


@pytest.mark.parametrize("which", ["sgd", "adamw"])
def test_samples_in_chunks_under_the_memory_budget_equal_one_pass(which, caplog):
    """The sweep over chunks of 5 samples (a memory budget of 5 per-sample states) equals one pass, random ACC coins
    included: a sample's coins and state do not depend on the chunk it falls in."""
    problem = make_problem(num_samples=23, batch_size=5) if which == "sgd" else make_adam_problem(num_samples=23, batch_size=5)
    method = "acc-sgd-ie" if which == "sgd" else "acc-adam-ie"
    rule = build_method(problem, method)
    one_pass = estimate_influence(problem, rule, policy=CorrectionPolicy("random", p=0.5, seed=2), schedule="sweep",
                                  progress=False)
    state_bytes = (2 if which == "sgd" else 3) * problem.curvature.dim * 8
    with caplog.at_level(logging.INFO, logger="hf_accinf"):
        chunked = estimate_influence(problem, rule, policy=CorrectionPolicy("random", p=0.5, seed=2), schedule="sweep",
                                     memory_budget_gb=5 * 3 * state_bytes / 2**30, progress=False)
    assert "5 chunks of 5 samples" in caplog.text
    torch.testing.assert_close(chunked.embeddings, one_pass.embeddings, rtol=1e-12, atol=1e-15)


def test_a_run_trained_without_clipping_is_scored(tmp_path):
    """max_grad_norm 0: the Trainer computes no gradient norm (recorded as NaN), and the run is scored; without
    clipping an SGD step is linear in the row weights, so exact and first-order removal coincide."""
    record_run(tiny_vit(hidden_size=16), digits_dataset(**TRAIN), tmp_path / "run", optim="sgd",
               optim_args="momentum=0.9", learning_rate=0.05, max_grad_norm=0.0, per_device_train_batch_size=16,
               num_train_epochs=1)
    trajectory = RunReader(tmp_path / "run").trajectory()
    assert bool(trajectory.grad_norm.isnan().all()) and bool((trajectory.clip_coef == 1).all())
    exact = _score(tmp_path / "run", tmp_path / "exact", method="acc-sgd-ie", removal="exact", dtype="float64")
    first = _score(tmp_path / "run", tmp_path / "first", method="acc-sgd-ie", removal="first-order", dtype="float64")
    assert bool(exact.scores.isfinite().all()) and exact.scores.abs().max() > 0
    torch.testing.assert_close(first.scores, exact.scores, rtol=1e-9, atol=1e-12 * float(exact.scores.abs().max()))


@pytest.mark.parametrize("key,what", [("loss", "loss"), ("grad.weight", "gradient of 'weight'")])
def test_a_stored_non_finite_loss_or_gradient_is_refused_naming_the_step(adamw_run, tmp_path, key, what):
    broken = tmp_path / "run"
    shutil.copytree(adamw_run, broken)
    segment = next((broken / "steps").iterdir())
    tensors = load_file(segment)
    tensors[key][3] = float("inf") if key == "loss" else float("nan")
    save_file(tensors, segment)
    with pytest.raises(AccInfError, match=f"non-finite {what} at step 3"):
        _score(broken, tmp_path / "scores")
