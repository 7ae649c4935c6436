"""The default HF recipe end to end: AccInfTrainer with TrainingArguments' default optimizer (adamw_torch),
warm-up then linear decay and clipping at 1.0, scored by every method that models it, from Python and the CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from hf_accinf import AccInfError, AccInfTrainer, RecordingArguments
from hf_accinf.cli import main
from hf_accinf.config import ScoreArguments
from hf_accinf.inputs.evaluation import head_inputs
from hf_accinf.examples import synthetic_text_dataset, tiny_bert
from hf_accinf.methods.registry import method_names
from hf_accinf.problem import problem_from_run
from hf_accinf.scoring import score_run
from hf_accinf.trajectory import RunReader
from tests.conftest import record_run


@pytest.fixture(scope="module")
def default_recipe(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("adamw") / "accinf"
    data = synthetic_text_dataset(24)
    trainer = record_run(tiny_bert(), data, run_dir, warmup_steps=0.25, learning_rate=5e-3)
    assert trainer.args.optim.value in ("adamw_torch", "adamw_torch_fused") and trainer.args.max_grad_norm == 1.0
    return run_dir, data


def test_the_run_records_adamw_moments_and_step_counts(default_recipe):
    run_dir, _ = default_recipe
    run = RunReader(run_dir)
    trajectory = run.trajectory()
    assert run.manifest.optimizer_class == "AdamW"
    assert torch.equal(trajectory.optimizer_step_count, torch.arange(trajectory.num_steps))  # count before each step
    assert all(trajectory.states[f"{name}.exp_avg"][0].abs().max() == 0 for name in run.manifest.head.chosen)
    assert method_names(run.manifest.optimizer_class) == ["adam-ie", "acc-adam-ie", "dvemb", "acc-dvemb", "adam-ie-sketch",
                                                          "tracin"]


@pytest.mark.parametrize("method", ["adam-ie", "acc-adam-ie", "dvemb", "acc-dvemb", "adam-ie-sketch", "tracin"])
def test_adam_family_and_tracin_score_the_default_recipe(default_recipe, method, tmp_path):
    run_dir, data = default_recipe
    form = "auto" if method == "tracin" else "forward"
    result = score_run(ScoreArguments(run_dir=str(run_dir), method=method, form=form, modules=["head"],
                                      output_dir=str(tmp_path)), data,
                       data, progress=False)
    assert result.scores.shape == (24,) and torch.isfinite(result.scores).all() and result.scores.abs().max() > 0
    assert (tmp_path / "scores.safetensors").is_file()
    assert (tmp_path / "embeddings.safetensors").is_file() == (method != "tracin")
    if method == "adam-ie":  # the adjoint form through AdamW gives the forward form's classical scores
        adjoint = score_run(ScoreArguments(run_dir=str(run_dir), method=method, form="adjoint", modules=["head"],
                                           output_dir=str(tmp_path / "adjoint")), data, data, progress=False)
        assert adjoint.form == "adjoint"
        torch.testing.assert_close(adjoint.scores, result.scores, rtol=1e-9, atol=1e-12 * float(result.scores.abs().max()))
    if method == "tracin":  # TracIn by hand: sum over steps of w_r eta_t grad L(theta_t) . g_r(theta_t)
        run = RunReader(run_dir)
        problem = problem_from_run(run)
        inputs, labels = head_inputs(run.build_model(), run.manifest.head.module, data)
        trajectory, curvature = problem.trajectory, problem.curvature
        expected = torch.zeros(24, dtype=torch.float64)
        for step in range(trajectory.num_steps):
            params = {n: v[step] for n, v in trajectory.params.items()}
            objective = curvature.objective_grad(params, inputs, labels)
            rows = trajectory.rows_of(step)
            for position, row in enumerate(trajectory.row_index[rows].tolist()):
                gradient = curvature.example_grads(params, trajectory.head_input[rows][position : position + 1],
                                                   trajectory.labels[rows][position : position + 1])[0]
                expected[row] += float(trajectory.row_weight[rows][position] * trajectory.lr[step, 0]
                                       * (gradient @ objective))
        torch.testing.assert_close(result.scores, expected, rtol=1e-9, atol=1e-15)


def test_direct_scorers_refuse_other_score_kinds(default_recipe, tmp_path):
    run_dir, data = default_recipe
    with pytest.raises(AccInfError, match="linear"):
        score_run(ScoreArguments(run_dir=str(run_dir), method="tracin", score_kind="cosine", output_dir=str(tmp_path)),
                  data, data, progress=False)


def test_cli_scores_with_acc_adam_ie(default_recipe, tmp_path):
    run_dir, data = default_recipe
    data.save_to_disk(str(tmp_path / "train"))
    assert main(["score", "--run_dir", str(run_dir), "--method", "acc-adam-ie", "--train_data", str(tmp_path / "train"),
                 "--eval_data", str(tmp_path / "train"), "--output_dir", str(tmp_path / "scores")]) == 0
    assert load_file(tmp_path / "scores" / "scores.safetensors")["scores"].shape == (24,)
    with pytest.raises(AccInfError,
                       match="Methods for this run: adam-ie, acc-adam-ie, dvemb, acc-dvemb, adam-ie-sketch, tracin"):
        score_run(ScoreArguments(run_dir=str(run_dir), method="sgd-ie"), data, data)


def test_trainer_warns_at_construction_for_an_unmodelled_optimizer(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), optim="adafactor", use_cpu=True, report_to=[])
    with pytest.warns(UserWarning, match="no hf_accinf method models"):
        AccInfTrainer(model=tiny_bert(), args=args, train_dataset=synthetic_text_dataset(8),
                      recording=RecordingArguments(run_dir=str(tmp_path / "run")))


@pytest.mark.parametrize("modules,projection_dim", [(["head"], 16), (["all"], 16), (["head"], 4096)])
def test_dvemb_scores_any_scope_and_its_saved_embeddings_score_new_test_sets(default_recipe, modules, projection_dim,
                                                                            tmp_path):
    """Projected embeddings (N x k) on the head and on the whole model; ``attribution_matrix`` rebuilds the
    seeded projection and reproduces the scores from the saved embeddings without replaying the run."""
    from hf_accinf.scoring import attribution_matrix

    run_dir, data = default_recipe
    args = ScoreArguments(run_dir=str(run_dir), method="acc-dvemb", projection_dim=projection_dim, modules=modules,
                          output_dir=str(tmp_path), trust_probes=2, dtype="float64")
    result = score_run(args, data, data, progress=False)
    assert result.form == "forward" and torch.isfinite(result.scores).all() and result.scores.abs().max() > 0
    width = min(projection_dim, problem_from_run(RunReader(run_dir)).curvature.dim) if modules == ["head"] else projection_dim
    assert list(result.embeddings) == ["projected"] and result.embeddings["projected"].shape == (24, width)
    summary = json.loads((tmp_path / "scores.json").read_text())
    assert summary["projection"]["dim"] == width and summary["projection"]["identity"] == (width < projection_dim)
    matrix = attribution_matrix(str(run_dir), data, scores_dir=str(tmp_path))
    torch.testing.assert_close(matrix.mean(0), result.scores, rtol=1e-6, atol=1e-10 * float(result.scores.abs().max()))
    summary["projection"]["probe"][0] += 1.0  # a projection drawn differently is refused, not silently used
    (tmp_path / "scores.json").write_text(json.dumps(summary))
    with pytest.raises(AccInfError, match="differs"):
        attribution_matrix(str(run_dir), data, scores_dir=str(tmp_path))
    with pytest.raises(AccInfError, match="projected"):
        score_run(ScoreArguments(run_dir=str(run_dir), method="dvemb", score_kind="evaluated",
                                 output_dir=str(tmp_path / "evaluated")), data, data, progress=False)
    if projection_dim > 16:  # the head has fewer parameters than k: no projection, and the rest is as above
        return
    if modules is None:  # cosine: the same dot products over the embeddings' norms (|grad| is one constant)
        cosine = score_run(ScoreArguments(run_dir=str(run_dir), method="acc-dvemb", projection_dim=16,
                                          score_kind="cosine", output_dir=str(tmp_path / "cosine")), data, data,
                           progress=False)
        ratio = cosine.scores * result.embeddings["projected"].norm(dim=1) / result.scores
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-9, atol=0)
        assert cosine.scores.abs().max() <= 1 + 1e-12
    if modules is None:  # the classical twin by one backward pass gives the forward form's scores
        forward = score_run(ScoreArguments(run_dir=str(run_dir), method="dvemb", projection_dim=16, form="forward",
                                           output_dir=str(tmp_path / "forward")), data, data, progress=False)
        adjoint = score_run(ScoreArguments(run_dir=str(run_dir), method="dvemb", projection_dim=16,
                                           output_dir=str(tmp_path / "adjoint")), data, data, progress=False)
        assert adjoint.form == "adjoint"
        torch.testing.assert_close(adjoint.scores, forward.scores, rtol=1e-9,
                                   atol=1e-12 * float(forward.scores.abs().max()))
