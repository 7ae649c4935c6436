"""The README's main job through the installed ``hf-accinf`` command, CI-sized (configs/quickstart.yaml's header):
``train --config configs/quickstart.yaml``, then ``score --run_dir ... --verify 3`` with no data flags and no
method or scope (the defaults resolve from the run), then ``prune --dataset ...`` and ``report`` (these two through
the CLI's entry function in this process: a new interpreter costs about 10 s on a busy CI machine)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from datasets import load_from_disk
from safetensors.torch import load_file

from hf_accinf import RunReader
from hf_accinf.cli import main
from tests.launch import ROOT, hf_accinf

# What `hf-accinf score` resolves to on the quickstart's AdamW run with no method, scope or form given.
# The one place to change when the default changes (e.g. to {"method": "adam-ie", "modules": ["all"], "form": "adjoint"}).
EXPECTED_DEFAULT = {"method": "adam-ie", "modules": ["all"], "form": "adjoint"}
CI_SIZE = ["--train_rows", "64", "--eval_rows", "32", "--num_train_epochs", "1", "--disable_tqdm", "true",
           "--logging_strategy", "no"]
DROP_FRACTION = 0.05  # the README's


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    hf_accinf("train", "--config", ROOT / "configs/quickstart.yaml", *CI_SIZE, "--output_dir", out / "run", cwd=out)
    run_dir = out / "run" / "accinf"
    scored = hf_accinf("score", "--run_dir", run_dir, "--verify", "3", cwd=out)
    scores_dir = run_dir / "scores"
    assert main(["prune", "--dataset", str(scores_dir / "dataset"), "--drop_fraction", str(DROP_FRACTION),
                 "--output_dir", str(out / "pruned")]) == 0
    assert main(["report", "--dataset", str(scores_dir / "dataset"), "--output_dir", str(out / "report")]) == 0
    return run_dir, scores_dir, out, scored


def test_score_resolves_the_documented_default_for_the_adamw_run(main_job):
    run_dir, scores_dir, _, _ = main_job
    run = RunReader(run_dir)
    assert run.manifest.optimizer_class == "AdamW"
    written = json.loads((scores_dir / "scores.json").read_text())
    resolved = {"method": written["method"], "modules": written["modules"], "form": written["form"]}
    assert resolved == EXPECTED_DEFAULT
    # Whatever the default, it is the run's optimizer family and its fields agree with each other.
    assert written["method"] in ("adam-ie", "acc-adam-ie") and written["arguments"]["method"] == written["method"]
    model_parameters = [name for name, _ in run.build_model().named_parameters()]
    head = [f"{run.manifest.head.module}.{name}" for name in run.manifest.head.parameters]
    gauge = written["gauge"]  # tensors that do not change the outputs, left out of a deep scope (DESIGN 6b)
    assert set(gauge) <= set(model_parameters)
    expected_scope = {("head",): head, ("all",): [n for n in model_parameters if n not in gauge]}[tuple(written["modules"])]
    assert sorted(written["scope"]) == sorted(expected_scope)
    assert written["plan"]["method"] == written["method"] and written["plan"]["fallback"] is None
    assert written["form"] == ("adjoint" if written["method"] == "adam-ie" else "forward")  # form auto's rule
    values = load_file(scores_dir / "scores.safetensors")["scores"]
    assert values.shape == (run.manifest.dataset.length,) and bool(values.isfinite().all())


def test_verify_figures_are_present_and_sane(main_job):
    _, scores_dir, _, scored = main_job
    check = json.loads((scores_dir / "scores.json").read_text())["verify"]
    assert check["k"] == 3 and len(check["rows"]) == len(set(check["rows"])) == 3
    figures = [check["kendall_tau"], check["pearson_r"], check["linearity_ceiling"]["kendall_tau"],
               check["linearity_ceiling"]["pearson_r"]]
    assert all(math.isfinite(x) and -1 <= x <= 1 for x in figures)
    assert 0 <= check["sign_agreement"] <= 1
    assert f"Kendall tau {check['kendall_tau']:.3f}" in scored.stdout + scored.stderr


def test_prune_drops_the_lowest_scored_rows(main_job):
    _, scores_dir, out, _ = main_job
    written = json.loads((scores_dir / "scores.json").read_text())
    scored = load_from_disk(str(scores_dir / "dataset"))
    values = np.asarray(scored[written["column"]], dtype=np.float64)
    pruned = load_from_disk(str(out / "pruned" / "dataset"))
    dropped = math.floor(DROP_FRACTION * len(values))
    assert dropped > 0 and len(pruned) == len(values) - dropped
    kept_values = np.sort(np.asarray(pruned[written["column"]], dtype=np.float64))
    np.testing.assert_array_equal(kept_values, np.sort(values)[dropped:])


def test_report_describes_the_scores(main_job):
    _, scores_dir, out, _ = main_job
    written = json.loads((scores_dir / "scores.json").read_text())
    report = out / "report"
    text = (report / "report.md").read_text()
    assert (report / "report.html").is_file() and written["column"] in text and written["method"] in text
    assert all((report / image).is_file() for image in _images(text))


def _images(markdown: str) -> list[str]:
    import re

    return re.findall(r"\]\(([^)]+\.png)\)", markdown)


def test_summary_checks_the_replay_of_the_trained_run(main_job, capsys):
    run_dir, *_ = main_job
    assert main(["summary", str(run_dir), "--check_replay", "true"]) == 0
    out = capsys.readouterr().out
    assert "optimizer       AdamW" in out
    line = next(line for line in out.splitlines() if line.startswith("replay"))
    assert "(within the tolerance" in line and f"over {len(RunReader(run_dir).manifest.checkpoints) - 1} checkpoint" in line
