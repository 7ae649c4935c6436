"""Metrics of DESIGN.md section 7 on hand-computed cases, and the evaluate entry point."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hf_accinf.errors import AccInfError
from hf_accinf.cli import main as cli_main
from hf_accinf.evaluation.compare import evaluate_scores, load_values
from hf_accinf.evaluation.metrics import agreement, jaccard, kendall_tau, rmse, tails


def test_rmse_by_hand():
    assert rmse([1.0, 2.0, 3.0], [1.0, 0.0, 3.0]) == pytest.approx(np.sqrt(4 / 3))
    assert rmse(torch.tensor([0.5, -0.5]), torch.tensor([0.5, -0.5])) == 0.0


def test_kendall_tau_by_hand():
    # Pairs of (0, 1, 2, 3) against (0, 2, 1, 3): 5 concordant, 1 discordant -> (5 - 1) / 6.
    assert kendall_tau([0, 1, 2, 3], [0, 2, 1, 3]) == pytest.approx(4 / 6)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


@pytest.mark.parametrize("n, percent, low, high", [(10, 10, 0, 1), (10, 30, 1, 2), (20, 50, 5, 5), (7, 70, 2, 2),
                                                   (400, 10, 20, 20), (400, 70, 140, 140), (9, 50, 2, 2)])
def test_tail_sizes_are_floor_and_ceil_of_half_of_int_n_k(n, percent, low, high):
    values = np.arange(n, dtype=float)[::-1]  # descending, so indices and ranks differ
    chosen = tails(values, percent)
    count = int(n * percent / 100)
    assert (low, high) == (count // 2, count - count // 2)
    lowest = set(range(n - low, n))  # the smallest values sit at the end
    highest = set(range(high))
    assert chosen == lowest | highest


def test_jaccard_by_hand():
    truth = np.array([-5.0, -1.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 2.0, 6.0])
    # c = int(10 * 40 / 100) = 4: two lowest {0, 1} and two highest {8, 9}.
    estimate = truth.copy()
    estimate[1], estimate[7] = 0.45, -3.0  # sample 7 takes sample 1's place among the lowest
    assert tails(truth, 40) == {0, 1, 8, 9}
    assert tails(estimate, 40) == {0, 7, 8, 9}
    assert jaccard(estimate, truth, 40) == pytest.approx(3 / 5)
    assert jaccard(truth, truth, 10) == 1.0
    # c = int(10 * 10 / 100) = 1: no lowest, one highest.
    assert tails(truth, 10) == {9}
    flipped = truth.copy()
    flipped[[8, 9]] = flipped[[9, 8]]
    assert jaccard(flipped, truth, 10) == 0.0


def test_agreement_keys():
    report = agreement([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.5])
    assert list(report) == ["rmse", "kendall_tau", "jaccard@10", "jaccard@30", "jaccard@50", "jaccard@70"]
    assert report["kendall_tau"] == 1.0 and report["rmse"] == pytest.approx(0.25)


def test_evaluate_reads_safetensors_npy_csv_and_a_saved_dataset(tmp_path, capsys):
    from datasets import Dataset

    rng = np.random.default_rng(0)
    truth, scores = rng.normal(size=50), rng.normal(size=50)
    save_file({"scores": torch.tensor(scores), "other": torch.zeros(50)}, str(tmp_path / "s.safetensors"))
    np.save(tmp_path / "t.npy", truth)
    (tmp_path / "t.csv").write_text("truth\n" + "\n".join(repr(float(v)) for v in truth))
    Dataset.from_dict({"text": ["x"] * 50, "influence_acc_sgd_ie": scores.tolist()}).save_to_disk(str(tmp_path / "ds"))

    expected = agreement(scores, truth)
    assert evaluate_scores(load_values(f"{tmp_path}/s.safetensors:scores"), load_values(str(tmp_path / "t.npy"))) == expected
    assert np.array_equal(load_values(f"{tmp_path}/t.csv:truth"), truth)
    assert np.array_equal(load_values(str(tmp_path / "ds")), scores)
    with pytest.raises(AccInfError, match="several tensors"):
        load_values(str(tmp_path / "s.safetensors"))

    assert cli_main(["evaluate", f"{tmp_path}/ds:influence_acc_sgd_ie", str(tmp_path / "t.npy"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(expected)
    assert cli_main(["evaluate", f"{tmp_path}/s.safetensors:scores", f"{tmp_path}/t.csv:truth", "--percents", "20"]) == 0
    assert "jaccard@20" in capsys.readouterr().out


def test_evaluate_refuses_mismatched_lengths(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros(5))
    np.save(tmp_path / "b.npy", np.zeros(6))
    assert cli_main(["evaluate", str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]) == 2
    assert "differ in length" in capsys.readouterr().err
