"""The leave-one-out harness against plain sequential retraining, and the --smoke paper reproduction end to end."""

import json
import math

import pytest
import torch
from torch import nn

from hf_accinf.evaluation.paper.datasets import NoiseSetting
from hf_accinf.evaluation.paper.experiments import ExperimentConfig, train
from hf_accinf.evaluation.retrain import leave_one_out_sgd, retrain_sgd_without


def sequential_retraining(run, removed: int) -> dict[str, torch.Tensor]:
    """The counterfactual by hand: torch.optim.SGD from the recorded initial weights, the recorded batches
    without ``removed``, the recorded divisor and learning rates, one sample at a time out of the loop."""
    model = run.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(run.trajectory.params[name][0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=run.weight_decay)
    for step in range(run.trajectory.num_steps):
        batch = run.trajectory.batch(step)
        kept = batch[batch != removed]
        for group in optimizer.param_groups:
            group["lr"] = float(run.trajectory.lr[step, 0])
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(run.split.x_train[kept]), run.split.y_train[kept], reduction="sum")
        (loss / len(batch)).backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("model", ["dnn", "logreg"])
def test_leave_one_out_equals_sequential_retraining(model):
    config = ExperimentConfig("digits", model, NoiseSetting("label", 0.2), seed=3, epochs=3, n_train=60, n_val=40,
                              batch_size=20)
    run = train(config)
    assert run.trajectory.num_steps == 9 and (run.weight_decay > 0) == (model == "logreg")
    samples = torch.tensor([4, 31])
    vmapped = leave_one_out_sgd(run.model, run.trajectory, run.spec, run.split.x_train, run.split.y_train, samples)
    keep = torch.ones(2, 60, dtype=torch.float64)
    keep[0, 4] = keep[1, 31] = 0
    masked = retrain_sgd_without(run.model, run.trajectory, run.spec, run.split.x_train, run.split.y_train, keep)
    for index, sample in enumerate(samples.tolist()):
        expected = sequential_retraining(run, sample)
        for name, value in expected.items():
            torch.testing.assert_close(vmapped[name][index], value, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(masked[name][index], value, rtol=1e-10, atol=1e-12)
        moved = sum(float((value - run.final[name]).norm()) for name, value in expected.items())
        assert moved > 0, "removing a sample must change the run"


def test_reproduce_paper_smoke(tmp_path):
    from hf_accinf.evaluation.paper import reproduce as script

    threads = torch.get_num_threads()
    try:
        assert script.main(["--smoke", "--output", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)

    text = (tmp_path / "RESULTS.md").read_text()
    for heading in ("## Setup", "## Headline", "## Table 1", "## Table 2", "### Part 1. Clean data",
                    "### Part 2. Feature noise", "### Part 3. Label noise", "## Section 6.4", "## Section 6.5",
                    "## Discussion"):
        assert heading in text, heading
    assert "*paper MNIST*" in text  # the paper's numbers stand beside ours
    for model in ("dnn", "logreg"):
        image = tmp_path / f"results_curves_{model}.png"
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({image.name})" in text

    raw = json.loads((tmp_path / "results.json").read_text())
    cells = {(r["config"]["model"], r["config"]["noise"]["kind"]) for r in raw["tables"]}
    assert cells == {(m, n) for m in ("dnn", "logreg") for n in ("clean", "feature", "label")}
    for record in raw["tables"]:
        for method in ("sgd-ie", "acc-sgd-ie"):
            for kind in ("linear", "evaluated"):
                metrics = record["metrics"][method][kind]
                assert -1 <= metrics["kendall_tau"] <= 1 and metrics["rmse"] >= 0
                assert all(0 <= metrics[f"jaccard@{k}"] <= 1 for k in (10, 30, 50, 70))
            assert math.isfinite(record["shift_error"][method])
    for model, results in raw["cleansing"].items():
        for result in results:
            errors = result["test_error"]
            assert set(errors) == {"sgd-ie", "acc-sgd-ie", "leave-one-out", "random"}
            # Removing nothing is the same retraining for every ranking.
            assert len({round(e[0], 12) for e in errors.values()}) == 1
    # The convex estimators' embeddings track the retrained parameter shifts closely (a smooth, strongly
    # convex problem over two epochs), and ACC-SGD-IE no worse than SGD-IE there.
    logreg = [r for r in raw["tables"] if r["config"]["model"] == "logreg"]
    assert all(r["shift_error"]["acc-sgd-ie"] <= r["shift_error"]["sgd-ie"] + 1e-12 for r in logreg)
