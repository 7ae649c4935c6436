"""The scoring plan: what ``auto`` resolves to, and why, for every kind of request (DESIGN.md 6b, "The default")."""

from __future__ import annotations

import pytest
import torch

from hf_accinf import ScoreArguments
from hf_accinf.errors import AccInfError
from hf_accinf.examples import digits_dataset, tiny_vit
from hf_accinf.scoring.plan import plan_scoring
from hf_accinf.trajectory import RunReader
from tests.conftest import record_run


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plan") / "run"
    record_run(tiny_vit(seed=0), digits_dataset(32), run_dir, num_train_epochs=1)  # the HF default: AdamW
    run = RunReader(run_dir)
    assert run.manifest.optimizer_class == "AdamW"
    return run, run.build_model()


def plan(adamw_run, unavailable=None, **options):
    run, model = adamw_run
    return plan_scoring(ScoreArguments(run_dir=str(run.run_dir), **options), run, model, unavailable)


def test_the_default_is_the_whole_model_classical_adjoint_in_float32(adamw_run):
    chosen = plan(adamw_run)
    assert (chosen.method, chosen.modules, chosen.deep, chosen.form) == ("adam-ie", ("all",), True, "adjoint")
    assert chosen.dtype == torch.float32 and chosen.policy is None and chosen.fallback is None
    saved = chosen.arguments(ScoreArguments(run_dir="x"))
    assert (saved.method, saved.modules, saved.form, saved.dtype) == ("adam-ie", ["all"], "adjoint", "float32")
    assert set(chosen.reasons) == {"scope", "method", "form", "dtype", "device", "memory_budget"}


def test_a_run_that_cannot_be_replayed_falls_back_to_the_head_and_says_why(adamw_run, caplog):
    chosen = plan(adamw_run, unavailable="the run was recorded before replay existed")
    assert (chosen.method, chosen.modules, chosen.deep, chosen.form) == ("acc-adam-ie", None, False, "forward")
    assert chosen.fallback == "the run was recorded before replay existed"
    assert chosen.to_dict()["fallback"] == chosen.fallback and chosen.dtype == torch.float64
    with caplog.at_level("WARNING", logger="hf_accinf"):
        chosen.log()
    assert "recorded before replay existed" in caplog.text


def test_the_head_by_name_runs_the_accumulative_forward_form(adamw_run):
    chosen = plan(adamw_run, modules=["head"])
    assert (chosen.method, chosen.deep, chosen.form, chosen.dtype) == ("acc-adam-ie", False, "forward", torch.float64)
    inside = plan(adamw_run, modules=["classifier"])  # the recorded head's module, named: the same fast path
    assert not inside.deep and inside.method == "acc-adam-ie"


def test_explicit_choices_are_kept(adamw_run):
    chosen = plan(adamw_run, method="tracin", modules=["last:1"], dtype="float64")
    assert (chosen.method, chosen.modules, chosen.deep, chosen.form) == ("tracin", ("last:1",), True, "direct")
    assert chosen.dtype == torch.float64
    assert plan(adamw_run, method="adam-ie", form="forward").form == "forward"


def test_per_row_states_that_do_not_fit_the_budget_keep_to_the_head(adamw_run):
    run, model = adamw_run
    rows, parameters = 32, sum(p.numel() for p in model.parameters())
    needed_gb = rows * 3 * parameters * 4 / 2**30  # acc-adam-ie's forward states over the whole model, float32
    tight = plan(adamw_run, method="acc-adam-ie", memory_budget_gb=needed_gb / 2)
    assert not tight.deep and tight.form == "forward" and "--memory_budget_gb" in tight.reasons["scope"]
    roomy = plan(adamw_run, method="acc-adam-ie", memory_budget_gb=needed_gb * 2)
    assert roomy.deep and roomy.form == "forward"


def test_a_method_for_another_optimizer_is_refused_before_any_work(adamw_run):
    with pytest.raises(AccInfError, match="adam-ie"):
        plan(adamw_run, method="sgd-ie")


def test_dvemb_on_the_whole_model_is_warned_about_on_the_head_not(adamw_run, caplog):
    whole = plan(adamw_run, method="dvemb")
    assert whole.deep and len(whole.warnings) == 1 and "docs/FIDELITY.md" in whole.warnings[0]
    with caplog.at_level("WARNING", logger="hf_accinf"):
        whole.log()
    assert whole.warnings[0] in caplog.text and whole.to_dict()["warnings"] == list(whole.warnings)
    assert plan(adamw_run, method="dvemb", modules=["head"]).warnings == ()
    assert plan(adamw_run).warnings == ()
