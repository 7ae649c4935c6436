"""The cleansing check: label noise is injected exactly as reported, each ranking retrains without exactly the rows
it flags, and a real estimator (ACC-SGD-IE on a recorded tiny ViT) flags injected label noise better than random."""

import numpy as np
import pytest
from datasets import Dataset

from hf_accinf import AccInfError, ScoreArguments, score_run
from hf_accinf.data.cleanse import RANDOM, cleansing_check, flagged_rows, inject_label_noise
from hf_accinf.data.columns import add_score_column, attach_scores
from hf_accinf.examples import digits_dataset, tiny_vit
from tests.conftest import record_run


def test_label_noise_moves_exactly_the_reported_rows_to_another_class():
    clean = Dataset.from_dict({"labels": [i % 4 for i in range(100)]})
    noisy, rows = inject_label_noise(clean, 0.25, num_labels=4, seed=3)
    before, after = np.asarray(clean["labels"]), np.asarray(noisy["labels"])
    assert len(rows) == 25 and np.array_equal(np.flatnonzero(before != after), rows)
    assert after.min() >= 0 and after.max() <= 3
    with pytest.raises(AccInfError, match="must lie in"):
        inject_label_noise(clean, 1.0, num_labels=4)


def test_each_ranking_retrains_without_exactly_its_flagged_rows():
    rng = np.random.default_rng(5)
    first, second = rng.normal(size=40), rng.normal(size=40)
    data = add_score_column(Dataset.from_dict({"row": list(range(40))}), first, "influence_a")
    data = add_score_column(data, second, "influence_b")
    seen = []

    def recipe(rows):  # records what it was trained on; "accuracy" = share of rows kept
        seen.append(sorted(rows["row"]))
        return len(rows) / 40

    noisy = np.argsort(first)[:6]  # the five most harmful by influence_a are all noisy
    report = cleansing_check(data, ["influence_a", "influence_b"], 0.125, recipe, noisy_rows=noisy, random_draws=2)
    assert seen[0] == list(range(40))
    assert seen[1] == sorted(set(range(40)) - set(np.argsort(first)[:5].tolist()))
    assert seen[2] == sorted(set(range(40)) - set(np.argsort(second)[:5].tolist()))
    assert all(len(rows) == 35 for rows in seen[3:]) and len(seen) == 5
    assert report.row("influence_a").noisy_recall == 5 / 6 and report.row("influence_a").noisy_precision == 1.0
    assert report.row(f"{RANDOM} (mean of 2)").test_accuracy == 35 / 40
    assert "| influence_b | 5 |" in report.to_markdown()
    with pytest.raises(AccInfError, match="Unknown score column"):
        cleansing_check(data, ["influence_c"], 0.1, recipe)


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cleanse")
    train, noisy = inject_label_noise(digits_dataset(128, seed=0), 0.2, num_labels=10, seed=0)
    record_run(tiny_vit(seed=0, hidden_size=64), train, root / "run", per_device_train_batch_size=32, num_train_epochs=6,
               learning_rate=0.1, optim="sgd", optim_args="momentum=0.9", weight_decay=0.01, max_grad_norm=1.0)
    score_run(ScoreArguments(run_dir=str(root / "run"), method="acc-sgd-ie", modules=["head"], output_dir=str(root / "scores")),
              train, digits_dataset(200, seed=0, offset=128), progress=False)
    return attach_scores(train, root / "scores"), noisy


def test_acc_sgd_ie_flags_injected_label_noise_better_than_random(noisy_run):
    scored, noisy = noisy_run
    flagged = flagged_rows(scored, "influence_acc_sgd_ie", 0.2)
    recall = len(set(flagged.tolist()) & set(noisy.tolist())) / len(noisy)
    random_recall = len(flagged) / 128  # the expected recall of flagging as many rows at random (hypergeometric mean)
    assert recall >= random_recall + 0.1
