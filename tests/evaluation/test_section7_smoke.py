"""The section 7 reproduction (scripts/reproduce_section7.py --smoke) end to end, and the invariants of its parts."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hf_accinf.evaluation.paper.experiments import ExperimentConfig, leave_one_out_truth, problem_of, truncated_run
from hf_accinf.evaluation.paper.family import (METRICS, AdamRecipe, Estimator, SGDSetting, estimator_scores, loss_changes,
                                         train_adam_recipe, train_sgd_setting)

TINY = ExperimentConfig("digits", "dnn", n_train=60, n_val=40, batch_size=20)


@pytest.fixture(scope="module")
def script():
    from hf_accinf.evaluation.paper import section7

    return section7


def test_reproduce_section7_smoke(script, tmp_path):
    (tmp_path / "RESULTS.md").write_text("# Earlier results\n\nkept as they are\n")
    threads = torch.get_num_threads()
    try:
        assert script.main(["--smoke", "--output", str(tmp_path)]) == 0
        # Re-rendering replaces the section 7 block instead of adding a second one.
        assert script.main(["--smoke", "--output", str(tmp_path), "--from-json", str(tmp_path / "section7.json")]) == 0
    finally:
        torch.set_num_threads(threads)

    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("# Earlier results\n\nkept as they are\n")
    assert text.count(script.BEGIN) == text.count(script.END) == text.count("## Section 7 — the broader family") == 1
    for heading in ("### Table 3", "### What the projection costs", "### Table 4", "### How far ACC moves"):
        assert heading in text, heading
    assert "*paper ACC-Adam-IE*" in text

    raw = json.loads((tmp_path / "section7.json").read_text())
    settings = script.Section7Settings.smoke()
    rows, runs = raw["rows"], raw["runs"]
    for setting in settings.sgd:
        last = max(setting.eval_epochs)
        for seed in settings.seeds:
            for epoch in setting.eval_epochs:
                got = [r["estimator"] for r in rows if (r["table"], r["setting"], r["seed"], r["epoch"]) ==
                       ("3", setting.name, seed, epoch)]
                assert sorted(got) == sorted(e.label for e in setting.estimators(epoch == last))
                assert {"TracIn", "DVEmb (no projection)", "ACC-DVEmb (no projection)"} <= set(got)
    for recipe in settings.adam:
        for seed in settings.seeds:
            got = {(r["estimator"], r["score"]) for r in rows if (r["table"], r["setting"], r["seed"]) ==
                   ("4", recipe.name, seed)}
            expected = {(e.label, kind) for e in recipe.estimators() for kind in ("cosine", "linear")}
            assert got == expected | {("TracIn", "linear")}
    for row in rows:
        assert all(math.isfinite(row[m]) for m in METRICS), row
        assert -1 <= row["kendall_tau"] <= 1 and all(0 <= row[m] <= 1 for m in METRICS[1:]), row
        # ACC rows measure how far ACC moved their embeddings from the classical twin's; in the first epoch
        # every row has occurred once, where the ACC term multiplies a zero state: no move at all.
        if row["method"].startswith("acc-"):
            assert math.isfinite(row["acc_change"]) and row["acc_change"] >= 0, row
            if row["table"] == "3" and row["epoch"] == 1:
                assert row["acc_change"] < 1e-12, row
        else:
            assert row["acc_change"] is None, row
    assert len(runs) == len(settings.seeds) * (sum(len(s.eval_epochs) for s in settings.sgd) + len(settings.adam))
    for run in runs:
        assert -1 <= run["linearity_ceiling"] <= 1 and 0 <= run["val_accuracy"] <= 1, run


def test_loss_changes_at_weight_zero_are_the_leave_one_out_truth():
    run = train_sgd_setting(SGDSetting(eval_epochs=(2,), experiment=TINY), seed=1)
    torch.testing.assert_close(loss_changes(run, 0.0), leave_one_out_truth(run)[0], rtol=1e-10, atol=1e-14)
    # Weight 1 is the recorded run itself.
    torch.testing.assert_close(loss_changes(run, 1.0), torch.zeros(60, dtype=torch.float64), rtol=0, atol=1e-13)


@pytest.mark.parametrize("table", ["sgd", "adam"])
def test_acc_equals_its_classical_twin_while_every_row_has_occurred_once(table):
    """In the first epoch every row occurs once, where its state is still 0: the ACC term (a multiple of the
    state: ``c g~ (g~ . x)``, ``c H_j Delta``, or ``J_s step(w^-j) Delta``) vanishes, so ACC changes nothing."""
    if table == "sgd":
        full = train_sgd_setting(SGDSetting(eval_epochs=(2,), experiment=TINY), seed=0)
        run = truncated_run(full, TINY.steps_per_epoch)
        pairs = [(Estimator("dvemb", 16), Estimator("acc-dvemb", 16)), (Estimator("dvemb", 0), Estimator("acc-dvemb", 0)),
                 (Estimator("sgd-ie"), Estimator("acc-sgd-ie"))]
    else:
        run = train_adam_recipe(replace(AdamRecipe(epochs=1), experiment=TINY), seed=0)
        pairs = [(Estimator("adam-ie", removal=r), Estimator("acc-adam-ie", removal=r)) for r in ("exact", "first-order")]
    problem = problem_of(run)
    for classical, acc in pairs:
        expected = estimator_scores(run, problem, classical)["linear"]
        torch.testing.assert_close(estimator_scores(run, problem, acc)["linear"], expected, rtol=1e-10, atol=1e-16)
        assert expected.abs().max() > 0


def test_a_results_rewrite_keeps_the_section7_block():
    """scripts/reproduce_paper.py regenerates RESULTS.md whole and carries the section 7 block over."""
    from hf_accinf.evaluation.paper.render import SECTION_7_BEGIN, SECTION_7_END, section7_block, splice_section7

    block = f"{SECTION_7_BEGIN}\n## Section 7\nnumbers\n{SECTION_7_END}\n"
    written = splice_section7("# Results\n", block)
    assert section7_block(written) == block.rstrip("\n")
    rewritten = splice_section7("# Results, regenerated\n", section7_block(written))
    assert rewritten == "# Results, regenerated\n\n" + block
    assert splice_section7(rewritten, block.replace("numbers", "new numbers")).count(SECTION_7_BEGIN) == 1


def test_docs_section7_is_rendered_from_the_committed_json(script):
    """docs/RESULTS.md's section 7 is exactly what the script renders from docs/section7.json (never hand-edited)."""
    from hf_accinf.evaluation.paper.render import section7_block

    docs = Path(__file__).resolve().parents[2] / "docs"
    raw = json.loads((docs / "section7.json").read_text())
    rendered = script.section_markdown(raw, script.discussion_markdown(raw))
    assert section7_block((docs / "RESULTS.md").read_text()) == rendered.rstrip("\n")
