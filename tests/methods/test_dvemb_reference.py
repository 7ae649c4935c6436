"""Projected methods from ``score_run`` (whole model): the reference check against the exact classical adjoint
(``trust.reference`` in scores.json, issue 22) and the sketch method end to end."""

import json
import logging

import pytest
import torch
from scipy import stats

from hf_accinf import AccInfError, ScoreArguments, attribution_matrix, score_run
from hf_accinf.examples import digits_dataset
from hf_accinf.scoring import artifacts

# test_numerics' run: the HF default recipe (AdamW, warm-up, linear decay, clipping 1.0) on a tiny ViT, 6 steps.
from tests.scoring.test_numerics import EVAL, TRAIN, adamw_run  # noqa: F401 (a module fixture)


def _score(run_dir, out, **options):
    options = {"modules": ["all"], "trust_probes": 0, **options}
    args = ScoreArguments(run_dir=str(run_dir), output_dir=str(out), dtype="float64", **options)
    return score_run(args, digits_dataset(**TRAIN), digits_dataset(**EVAL), progress=False)


@pytest.fixture(scope="module")
def exact_scores(adamw_run, tmp_path_factory):
    """The exact Adam-IE adjoint's scores of the whole model, run independently of the check."""
    return _score(adamw_run, tmp_path_factory.mktemp("exact"), method="adam-ie", form="adjoint").scores


def test_dvemb_carries_its_agreement_with_the_exact_adjoint(adamw_run, exact_scores, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="hf_accinf"):
        result = _score(adamw_run, tmp_path / "dvemb", method="dvemb", projection_dim=64)
    check = result.trust["reference"]
    assert check["reference"] == "adam-ie adjoint" and check["rows"] == len(exact_scores)
    assert check["kendall_tau"] == pytest.approx(stats.kendalltau(result.scores, exact_scores).statistic, abs=1e-12)
    assert check["pearson_r"] == pytest.approx(stats.pearsonr(result.scores, exact_scores).statistic, abs=1e-12)
    assert check["low"] == (check["kendall_tau"] < check["threshold"])
    saved = json.loads((tmp_path / "dvemb" / artifacts.SUMMARY_NAME).read_text())
    assert saved["trust"]["reference"] == check
    if check["low"]:
        assert "do not act on them" in caplog.text
    assert _score(adamw_run, tmp_path / "off", method="dvemb", projection_dim=64, reference_check="off").trust is None


def test_the_sketch_at_k_equal_p_scores_the_exact_adjoint_and_writes_its_embeddings(adamw_run, tmp_path):
    """adam-ie-sketch unprojected (on the last block and the head: P adjoint vectors of the whole model are slow for
    a test): the forward form (the plan's choice) writes k = P numbers per row and its scores are the exact adjoint's;
    its reference check agrees fully."""
    exact = _score(adamw_run, tmp_path / "exact", method="adam-ie", form="adjoint", modules=["classifier"]).scores
    result = _score(adamw_run, tmp_path / "sketch", method="adam-ie-sketch", projection_dim=0, modules=["classifier"])
    assert result.form == "forward"
    torch.testing.assert_close(result.scores, exact, rtol=1e-9, atol=1e-12 * float(exact.abs().max()))
    projected = result.embeddings[artifacts.PROJECTED_NAME]
    assert projected.shape == (48, result.summary.projection["dim"]) and result.summary.projection["identity"]
    assert result.trust["reference"]["kendall_tau"] == pytest.approx(1.0)
    assert not result.trust["reference"]["low"]


def test_the_sketch_below_p_is_a_random_projection_of_the_exact_embeddings(adamw_run, exact_scores, tmp_path):
    """At k = 32 its embeddings are k numbers per row, recorded with the projection's fingerprint, and the trust
    figure is the exact method's power iteration."""
    result = _score(adamw_run, tmp_path / "k32", method="adam-ie-sketch", projection_dim=32, sketch_basis="random")
    assert result.embeddings[artifacts.PROJECTED_NAME].shape == (48, 32)
    assert result.summary.projection["dim"] == 32 and not result.summary.projection["identity"]
    check = result.trust["reference"]
    assert check["kendall_tau"] == pytest.approx(stats.kendalltau(result.scores, exact_scores).statistic, abs=1e-12)


def test_the_sketch_reports_the_tangent_growth_of_the_method_it_tracks(adamw_run, tmp_path):
    """The sketch's own transition is the identity: its trust figure is the exact method's power iteration."""
    exact = _score(adamw_run, tmp_path / "exact", method="adam-ie", form="forward", modules=["classifier"],
                   trust_probes=2).trust
    sketch = _score(adamw_run, tmp_path / "sketch", method="adam-ie-sketch", projection_dim=4, modules=["classifier"],
                    trust_probes=2).trust
    assert sketch["growth"] == pytest.approx(exact["growth"], rel=1e-9) and exact["growth"] != pytest.approx(1.0)
    assert sketch["epoch_growth"] == pytest.approx(exact["epoch_growth"], rel=1e-9)


def test_the_gradients_basis_from_score_run(adamw_run, tmp_path):
    """--sketch_basis gradients (the default) on the whole model: k numbers per row, the basis's fingerprint saved,
    and the reference check against the exact adjoint; an unknown basis is refused when the arguments are built, and
    attribution_matrix, which cannot rebuild the basis, refuses the embeddings with what to do instead."""
    result = _score(adamw_run, tmp_path / "basis", method="adam-ie-sketch", projection_dim=16)
    assert result.summary.arguments["sketch_basis"] == "gradients"
    assert result.embeddings[artifacts.PROJECTED_NAME].shape == (48, 16) and result.summary.projection["dim"] == 16
    with pytest.raises(AccInfError, match="gradients basis of adam-ie-sketch.*--method adam-ie --form adjoint"):
        attribution_matrix(str(adamw_run), digits_dataset(**EVAL), str(tmp_path / "basis"))
    assert -1.0 <= result.trust["reference"]["kendall_tau"] <= 1.0
    with pytest.raises(ValueError, match="sketch_basis"):
        ScoreArguments(sketch_basis="svd")


def test_the_sketch_refuses_the_adjoint_form_before_any_work(adamw_run, tmp_path):
    with pytest.raises(AccInfError, match="adam-ie --form adjoint is exact"):
        _score(adamw_run, tmp_path / "adjoint", method="adam-ie-sketch", form="adjoint")


def test_the_cli_warns_of_deep_dvemb_and_prints_its_reference_check(adamw_run, tmp_path, caplog, capsys):
    """``hf-accinf score --method dvemb --modules all``: the plan's deep-scope WARNING (methods.dvemb.deep_scope_warning)
    is logged, and the reference check is printed and saved; ``--reference_check off`` skips it."""
    from hf_accinf.cli import main
    from hf_accinf.methods.dvemb import deep_scope_warning

    digits_dataset(**TRAIN).save_to_disk(str(tmp_path / "train"))
    digits_dataset(**EVAL).save_to_disk(str(tmp_path / "eval"))
    common = ["score", "--run_dir", str(adamw_run), "--method", "dvemb", "--modules", "all", "--projection_dim", "32",
              "--trust_probes", "0", "--train_data", str(tmp_path / "train"), "--eval_data", str(tmp_path / "eval")]
    with caplog.at_level(logging.WARNING, logger="hf_accinf"):
        assert main(common + ["--output_dir", str(tmp_path / "on")]) == 0
    assert deep_scope_warning("dvemb", deep=True) in caplog.text
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "on" / artifacts.SUMMARY_NAME).read_text())["trust"]["reference"]
    assert f"reference check: Kendall tau {saved['kendall_tau']:.3f}, Pearson r {saved['pearson_r']:.3f}" in printed
    assert main(common + ["--output_dir", str(tmp_path / "off"), "--reference_check", "off"]) == 0
    assert "reference check" not in capsys.readouterr().out
    assert json.loads((tmp_path / "off" / artifacts.SUMMARY_NAME).read_text())["trust"] is None
