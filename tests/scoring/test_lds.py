"""LDS by replay (``--verify_subsets``) and the blocked adjoint behind its per-query scores.

Oracles: the sequential replay (:meth:`~hf_accinf.trajectory.replay.Replay.train`, one run at a time) for the
subset retraining; a run whose counterfactual effect is linear in the row weights (scores built from the
truth itself) for the statistic; ``Q`` single adjoint passes for the blocked one.
"""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file

from hf_accinf import RunReader, ScoreArguments
from hf_accinf.cli import main
from hf_accinf.data.hub import dataset_card, lds_rows
from hf_accinf.engine import CorrectionPolicy
from hf_accinf.engine.adjoint import adjoint_scores
from hf_accinf.examples import digits_dataset, tiny_vit
from hf_accinf.methods.registry import build_method
from hf_accinf.scoring import score_run
from hf_accinf.scoring.lds import (check_by_replay, draw_subsets, objective_lds, per_query_lds, spearman,
                                   subset_scales)
from hf_accinf.scoring.verify import evaluation_effects, leave_one_out_scales
from hf_accinf.trajectory.replay import Replay
from tests.conftest import record_run
from tests.engine.helpers import make_problem
from tests.scoring.lds_helpers import SGD, eval_losses, saved_digits_run


@pytest.mark.parametrize("removal,policy", [("exact", None), ("first-order", None),
                                            ("exact", CorrectionPolicy("stage", stages=[(1, 5)]))])
def test_the_blocked_adjoint_of_q_gradients_equals_q_single_adjoints(removal, policy):
    problem = make_problem(num_samples=12, batch_size=4)
    method = "acc-sgd-ie" if policy is not None else "sgd-ie"
    rule = build_method(problem, method, removal=removal)
    assert rule.at_step(0).takes_adjoint_blocks == (removal == "exact")  # one call for the block, or one per query
    gradients = torch.randn(3, rule.param_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    blocked = adjoint_scores(rule, problem, gradients, progress=False, policy=policy, probes=2)
    assert blocked.scores.shape == (3, problem.num_samples) and blocked.trust is not None
    for query, gradient in enumerate(gradients):
        single = adjoint_scores(rule, problem, gradient, progress=False, policy=policy).scores
        assert single.shape == (problem.num_samples,)
        assert (blocked.scores[query] - single).abs().max() <= 1e-10 * single.abs().max()


# -- the subset retraining and the statistic ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """SGD with momentum, decay and clipping: 40 digits, 10 steps."""
    run_dir = tmp_path_factory.mktemp("vit") / "run"
    data = digits_dataset(num_rows=40)
    record_run(tiny_vit(), data, run_dir, **SGD)
    return RunReader(run_dir), data, digits_dataset(num_rows=24, offset=40)


def test_the_subset_retraining_equals_the_sequential_replay_of_the_subset_removed(vit_run):
    run, data, eval_data = vit_run
    fractions = [0.1, 0.25]
    queries = torch.tensor([3, 11])
    _, lds, scored = check_by_replay(run, data, None, eval_data, torch.zeros(len(data)), subsets=3, fractions=fractions,
                                     seed=4, queries=queries, per_query=lambda q: torch.ones(len(q), len(data)),
                                     progress=False)
    assert scored.shape == (2, len(data)) and lds["queries"] == [3, 11]
    recorded = eval_losses(run, run.load_checkpoint(run.num_steps), eval_data)
    assert abs(lds["base_eval_loss"] - recorded.mean().item()) < 1e-5
    replay = Replay(run, data)
    for report, chosen in zip(lds["fractions"], draw_subsets(len(data), fractions, 3, seed=4)):
        assert chosen.shape == (3, round(report["fraction"] * len(data))) and report["size"] == chosen.shape[1]
        assert all(len(set(rows.tolist())) == len(rows) for rows in chosen)
        for index in (0, 2):
            for weight, key in ((0.0, "measured"), (0.5, "measured_half")):
                effect = eval_losses(run, replay.train({int(j): weight for j in chosen[index]}), eval_data) - recorded
                truth = effect.mean().item()
                assert abs(truth) > 1e-4 and abs(report[key][index] - truth) < 1e-3 * abs(truth) + 1e-6
                if weight == 0.0:  # each query's own loss change
                    measured = torch.tensor(report["measured_per_query"][index], dtype=torch.float64)
                    assert (measured - effect[queries]).abs().max() < 1e-3 * effect[queries].abs().max() + 1e-6
        # each query's prediction is the sum of its scores over the subset: here all ones, the subset's size
        assert report["predicted_per_query"] == [[float(chosen.shape[1])] * 2] * 3


def test_subset_scales_put_the_subset_and_nothing_else_at_the_weight():
    subsets = draw_subsets(30, [0.1, 0.5], 4, seed=1)
    assert [s.shape for s in subsets] == [(4, 3), (4, 15)]
    assert all(torch.equal(a, b) for a, b in zip(subsets, draw_subsets(30, [0.1, 0.5], 4, seed=1)))  # seeded
    assert not torch.equal(subsets[0], draw_subsets(30, [0.1], 4, seed=2)[0])
    scales = subset_scales(subsets[1], 30, 0.5)
    for row, chosen in zip(scales, subsets[1]):
        assert set((row == 0.5).nonzero().flatten().tolist()) == set(chosen.tolist()) and (row[row != 0.5] == 1).all()


def test_the_lds_of_an_additive_truth_is_one_and_shuffled_scores_lower_it():
    """A truth exactly additive in the rows (the change of a subset is the sum of its rows' changes, half weight
    half of it): scores equal to the rows' changes reach LDS 1, as does the ceiling; shuffled scores do not."""
    rng = np.random.default_rng(0)
    length, count, queries = 200, 40, 6
    row_effects = rng.normal(size=(queries, length))  # per query, each row's exact effect
    subsets = draw_subsets(length, [0.05], count, seed=0)[0].numpy()
    measured = row_effects[:, subsets].sum(-1).T  # (M, Q)
    objective = objective_lds(row_effects[0][subsets].sum(1), measured[:, 0], measured[:, 0] / 2, seed=0)
    assert objective["spearman"] == pytest.approx(1.0) and objective["linearity_ceiling"]["spearman"] == pytest.approx(1.0)
    assert objective["spearman_interval"] == pytest.approx([1.0, 1.0])
    per_query = per_query_lds(row_effects[:, subsets].sum(-1).T, measured, measured / 2, seed=0)
    assert per_query["spearman"] == pytest.approx(1.0) and per_query["linearity_ceiling"]["spearman"] == pytest.approx(1.0)
    shuffled = rng.permuted(row_effects, axis=1)
    assert objective_lds(shuffled[0][subsets].sum(1), measured[:, 0], measured[:, 0] / 2, 0)["spearman"] < 0.5
    lowered = per_query_lds(shuffled[:, subsets].sum(-1).T, measured, measured / 2, seed=0)
    assert lowered["spearman"] < 0.5 and lowered["spearman_interval"][1] < 0.9


@pytest.fixture(scope="module")
def gentle_run(tmp_path_factory):
    """Plain SGD at a small learning rate: the counterfactual change is nearly linear in the row weights."""
    run_dir = tmp_path_factory.mktemp("gentle") / "run"
    data = digits_dataset(num_rows=32)
    record_run(tiny_vit(), data, run_dir, optim="sgd", learning_rate=0.01, per_device_train_batch_size=8,
               num_train_epochs=3)
    return RunReader(run_dir), data, digits_dataset(num_rows=16, offset=32)


def test_scores_built_from_the_leave_one_out_truth_reach_lds_near_one_on_a_nearly_linear_run(gentle_run):
    """Scores equal to each row's exact leave-one-out effect, summed over a subset, predict the subset's exact
    effect up to the interactions of its rows (second order in the learning rate): on this gentle run LDS and
    ceiling are near 1 (0.95 leaves room for those interactions, which move a few of 24 ranks), and the same
    scores shuffled across rows lose it."""
    run, data, eval_data = gentle_run
    length, count = len(data), 24
    found = evaluation_effects(run, data, None, eval_data, leave_one_out_scales(torch.arange(length), length),
                               progress=False)
    truth = found.effects[:length]  # (N, E): each row's exact effect on each evaluation row
    queries = torch.tensor([0, 5, 9, 14])
    scores = found.mean(truth)
    _, lds, _ = check_by_replay(run, data, None, eval_data, scores, subsets=count, fractions=[0.125],
                                seed=0, queries=queries, per_query=lambda q: truth[:, q].T, progress=False)
    report = lds["fractions"][0]
    for part in (report["objective"], report["per_query"]):
        assert part["spearman"] > 0.95 and part["linearity_ceiling"]["spearman"] > 0.95
    subsets = draw_subsets(length, [0.125], count, seed=0)[0]
    assert np.allclose(scores[subsets].sum(1).numpy(), report["predicted"])
    shuffled = scores[torch.randperm(length, generator=torch.Generator().manual_seed(0))]
    assert spearman(shuffled[subsets].sum(1).numpy(), report["measured"]) < report["objective"]["spearman"] - 0.3


# -- the command -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return root, ["--run_dir", str(root / "run"), *saved_digits_run(root, 48, 10)]


@pytest.fixture(scope="module")
def lds_scored(saved_run):
    """``score --verify 3 --verify_subsets 4 --verify_fraction 0.1 0.2 --verify_queries 10`` (every evaluation row)."""
    root, data = saved_run
    out, printed = root / "scores", io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["score", *data, "--verify", "3", "--verify_subsets", "4", "--verify_fraction", "0.1", "0.2",
                     "--verify_queries", "10", "--trust_probes", "0", "--output_dir", str(out)]) == 0
    return root, out, printed.getvalue()


def test_score_with_verify_subsets_writes_lds_in_scores_json(lds_scored):
    root, out, printed = lds_scored
    assert "LDS at 0.1 (4 subsets of 5 rows" in printed and "LDS at 0.2 (4 subsets of 10 rows" in printed
    summary = json.loads((out / "scores.json").read_text())
    lds = summary["lds"]
    assert [r["fraction"] for r in lds["fractions"]] == [0.1, 0.2] and lds["subsets"] == 4
    assert summary["verify"]["k"] == 3 and lds["counterfactuals"] == 2 * 3 + 2 * 2 * 4  # one retraining for both
    for report in lds["fractions"]:
        assert len(report["measured"]) == len(report["predicted"]) == 4
        for part in (report["objective"], report["per_query"]):
            assert -1 <= part["spearman"] <= 1 and -1 <= part["linearity_ceiling"]["spearman"] <= 1
    # The per-query scores of all 10 evaluation rows average to the objective's scores: the adjoint is linear
    # in the objective gradient, and the mean evaluation loss is the mean of the rows' losses.
    written = load_file(str(out / "query_scores.safetensors"))
    scores = load_file(str(out / "scores.safetensors"))["scores"]
    assert written["queries"].tolist() == list(range(10)) == lds["queries"]
    torch.testing.assert_close(written["scores"].mean(0), scores.to(written["scores"].dtype), rtol=1e-4,
                               atol=1e-4 * scores.abs().max().item())


def test_the_card_and_the_report_show_the_lds(lds_scored):
    root, out, _ = lds_scored
    scored = load_from_disk(str(out / "dataset"))
    lds = json.loads((out / "scores.json").read_text())["lds"]
    rows = lds_rows(lds)
    assert [row[0] for row in rows] == ["0.1", "0.2"] and rows[0][1] == "4 x 5" and rows[0][-1] == "10"
    card = dataset_card(scored)
    assert "LDS over subsets retrained out (--verify_subsets)" in card and "| 0.1 | 4 x 5 |" in card
    assert main(["report", "--dataset", str(out / "dataset"), "--output_dir", str(root / "report")]) == 0
    report = (root / "report" / "report.md").read_text()
    assert "LDS over subsets retrained out (--verify_subsets)" in report and "4 x 10" in report


@pytest.mark.parametrize("method,form,options", [
    ("tracin", "auto", {}), ("sgd-ie", "forward", {}),
    # the hybrid, per query too; in float64, where its correction (2e-7 of the scores here) is resolved
    ("acc-sgd-ie", "adjoint", {"correction": "stage", "stage_epochs": ["0:1"], "dtype": "float64"})])
def test_the_per_query_scores_of_every_form_average_to_the_objective_scores(saved_run, method, form, options):
    root, _ = saved_run
    train, held_out = digits_dataset(48), digits_dataset(10, offset=48)  # the saved rows
    args = ScoreArguments(run_dir=str(root / "run"), method=method, form=form, verify_subsets=3, verify_fraction=[0.1],
                          verify_queries=10, trust_probes=0, output_dir=str(root / f"{method}-{form}"), **options)
    result = score_run(args, train, held_out, progress=False)
    assert result.form == ("direct" if method == "tracin" else form) and len(result.lds["queries"]) == 10
    written = load_file(str(result.output_dir / "query_scores.safetensors"))["scores"]
    tolerance = 1e-10 if options.get("dtype") == "float64" else 1e-4
    torch.testing.assert_close(written.mean(0), result.scores.to(written.dtype), rtol=tolerance,
                               atol=tolerance * result.scores.abs().max().item())


def test_a_fraction_too_small_for_the_rows_is_refused_before_any_work(saved_run, capsys):
    root, data = saved_run
    assert main(["score", *data, "--verify_subsets", "4", "--verify_fraction", "0.001", "--output_dir",
                 str(root / "refused")]) == 2
    assert "--verify_fraction 0.001 of 48 rows gives subsets of 0 rows" in capsys.readouterr().err
    assert not (root / "refused").exists()
