"""``--form``: the adjoint form's scores equal the forward form's on a recorded run; trust figures are written."""

import json

import pytest
from safetensors.torch import load_file

from hf_accinf import AccInfError
from hf_accinf.cli import main
from hf_accinf.config import ScoreArguments
from hf_accinf.examples import digits_dataset
from hf_accinf.scoring import score_run
from tests.conftest import record_digits_run


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("forms")
    return record_digits_run(out, 64)


def test_adjoint_and_forward_forms_write_the_same_scores(recorded):
    run_dir, data = recorded
    outputs = {}
    for form in ("forward", "auto"):
        assert main(["score", "--run_dir", str(run_dir), "--method", "sgd-ie", "--modules", "head", "--form", form,
                     "--output_dir", str(run_dir / form), *data]) == 0
        outputs[form] = (load_file(run_dir / form / "scores.safetensors")["scores"],
                         json.loads((run_dir / form / "scores.json").read_text()))
    (forward, forward_json), (adjoint, adjoint_json) = outputs["forward"], outputs["auto"]
    assert adjoint_json["form"] == "adjoint" and forward_json["form"] == "forward"  # auto: classical, linear
    assert (adjoint - forward).abs().max() <= 1e-9 * forward.abs().max()
    assert not (run_dir / "auto" / "embeddings.safetensors").exists()
    assert load_file(run_dir / "forward" / "embeddings.safetensors")["weight"].shape[0] == 64
    # Rescoring the forward run's directory in the adjoint form replaces the whole set: no stale embeddings.
    assert main(["score", "--run_dir", str(run_dir), "--method", "sgd-ie", "--modules", "head", "--form", "adjoint", "--overwrite",
                 "--output_dir", str(run_dir / "forward"), *data]) == 0
    assert not (run_dir / "forward" / "embeddings.safetensors").exists()
    for summary in (forward_json, adjoint_json):
        trust = summary["trust"]
        assert trust["growth"] > 0 and len(trust["epoch_growth"]) == 2
        assert trust["expansive"] == (trust["growth"] > trust["threshold"])
    assert forward_json["trust"]["embedding_ratio"]["max"] > 0 and adjoint_json["trust"]["embedding_ratio"] is None
    # The forward form's power iteration and the adjoint form's probes on its backward pass (engine.trust).
    assert forward_json["trust"]["kind"] == "power-iteration" and adjoint_json["trust"]["kind"] == "adjoint-probes"
    assert forward_json["dtype"] == adjoint_json["dtype"] == "float64"  # dtype auto: float64 on the head


def test_an_accumulative_method_in_the_adjoint_form_is_refused_before_any_work(recorded):
    run_dir = recorded[0]
    args = ScoreArguments(run_dir=str(run_dir), method="acc-sgd-ie", form="adjoint", output_dir=str(run_dir / "acc"))
    with pytest.raises(AccInfError, match="--form forward"):
        score_run(args, digits_dataset(64), digits_dataset(10, offset=64))
    assert not (run_dir / "acc").exists()


def test_verify_retrains_rows_out_and_writes_the_agreement(recorded, tmp_path):
    """``--verify K``: the figures in scores.json are those of K rows retrained out by replay (an oracle of its own,
    scoring.verify), and the scores they judge are the ones written."""
    from scipy import stats

    run_dir, data = recorded
    assert main(["score", "--run_dir", str(run_dir), "--method", "sgd-ie", "--modules", "all", "--form", "adjoint",
                 "--verify", "6", "--trust_probes", "0", "--output_dir", str(tmp_path / "scores"), *data]) == 0
    summary = json.loads((tmp_path / "scores" / "scores.json").read_text())
    check, scores = summary["verify"], load_file(tmp_path / "scores" / "scores.safetensors")["scores"]
    assert check["k"] == 6 and len(check["rows"]) == 6 and summary["replay"]["ok"]
    assert check["estimate"] == scores[check["rows"]].tolist()
    assert abs(check["kendall_tau"] - stats.kendalltau(check["estimate"], check["truth"]).statistic) < 1e-12
    assert summary["scope"][-1] == "classifier.bias" and len(summary["scope"]) > 2  # the whole model
    assert summary["dtype"] == "float32" and str(scores.dtype) == "torch.float32"  # dtype auto on a deep scope


def test_every_form_the_plan_can_choose_has_one_runner():
    from hf_accinf.options import FORM_NAMES
    from hf_accinf.scoring.forms import FORMS

    assert set(FORMS) == set(FORM_NAMES) and all(FORMS[name].name == name for name in FORM_NAMES)
