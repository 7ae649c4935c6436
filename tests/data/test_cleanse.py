"""The cleansing check: label noise is injected exactly as reported (seeded, the fraction asked, always another
class), each ranking retrains without exactly the rows it flags, the recall of the flipped rows is what a set
count says, seeds are summarized as mean and std, and a real estimator (ACC-SGD-IE on a recorded tiny ViT) flags
injected label noise better than random."""

import numpy as np
import pytest
from datasets import Dataset

from hf_accinf import AccInfError, ScoreArguments, score_run
from hf_accinf.data.cleanse import (NONE, RANDOM, CleansingReport, CleansingRow, cleansing_check, flagged_rows,
                                    inject_label_noise, noisy_recall, summarize_seeds)
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


@pytest.mark.parametrize("fraction", [0.1, 0.2])
def test_label_flipping_is_seeded_flips_the_fraction_asked_and_always_changes_the_class(fraction):
    clean = Dataset.from_dict({"labels": [i % 10 for i in range(250)]}).with_format("torch")
    first, rows = inject_label_noise(clean, fraction, num_labels=10, seed=7)
    again, rows_again = inject_label_noise(clean, fraction, num_labels=10, seed=7)
    other, rows_other = inject_label_noise(clean, fraction, num_labels=10, seed=8)
    before, after = np.asarray(clean["labels"]), np.asarray(first["labels"])
    assert len(rows) == round(fraction * 250) and len(np.unique(rows)) == len(rows)
    assert np.array_equal(np.flatnonzero(before != after), rows)  # every reported row changed class, no other did
    assert np.array_equal(rows, rows_again) and np.array_equal(after, np.asarray(again["labels"]))
    assert not np.array_equal(rows, rows_other)
    assert first.format["type"] == "torch"


def test_recall_of_flipped_rows_matches_a_set_count():
    rng = np.random.default_rng(0)
    for _ in range(20):
        flipped = rng.choice(100, size=rng.integers(1, 30), replace=False)
        dropped = rng.choice(100, size=rng.integers(1, 40), replace=False)
        hits = len(set(flipped.tolist()) & set(dropped.tolist()))
        assert noisy_recall(dropped, flipped) == (hits / len(flipped), hits / len(dropped))
    assert noisy_recall(np.arange(5), np.arange(5)) == (1.0, 1.0)


def test_an_oracle_ranking_recalls_every_flipped_row_and_the_recipe_may_report_loss():
    flipped = np.array([3, 11, 17, 29])
    scores = np.zeros(40)
    scores[flipped] = -1.0  # the oracle: exactly the flipped rows are harmful
    data = add_score_column(Dataset.from_dict({"row": list(range(40))}), scores, "influence_oracle")
    report = cleansing_check(data, ["influence_oracle"], 0.1, lambda rows: (len(rows) / 40, 40 / len(rows)),
                             noisy_rows=flipped)
    assert report.row("influence_oracle").noisy_recall == 1.0 and report.row("influence_oracle").noisy_precision == 1.0
    assert report.row("influence_oracle").test_loss == 40 / 36 and report.row(NONE).test_loss == 1.0
    assert 0.0 <= report.row(RANDOM).noisy_recall <= 1.0


def test_seed_summary_is_the_mean_and_sample_std_of_each_ranking_and_size():
    def report(accuracy, loss, recall):
        return CleansingReport([CleansingRow(NONE, 0, accuracy + 0.1, None, None, loss),
                                CleansingRow("influence_a", 5, accuracy, recall, recall, loss)])

    summary = {(s.ranking, s.removed): s for s in summarize_seeds([report(0.5, 1.0, 0.2), report(0.7, 2.0, 0.6),
                                                                   report(0.6, 3.0, 0.4)])}
    a = summary[("influence_a", 5)]
    assert a.seeds == 3 and np.allclose(a.accuracy, (0.6, np.std([0.5, 0.7, 0.6], ddof=1)))
    assert np.allclose(a.loss, (2.0, 1.0)) and np.allclose(a.recall, (0.4, 0.2))
    assert summary[(NONE, 0)].recall is None
    assert summarize_seeds([report(0.5, 1.0, 0.2)])[1].accuracy == (0.5, 0.0)


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
