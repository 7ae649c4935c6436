"""``hf-accinf prune`` as a command: attaches scoring outputs, writes the pruned set, and reports user errors as
one line with exit status 2."""

import numpy as np
from datasets import Dataset, load_from_disk

from hf_accinf.cli import main
from hf_accinf.data.columns import read_provenance
from tests.data.helpers import fake_run_dir, fake_scores_dir


def test_prune_command_writes_the_pruned_dataset_with_provenance(tmp_path, capsys):
    scores = np.random.default_rng(2).normal(size=40)
    run = fake_run_dir(tmp_path / "run")
    scores_dir = fake_scores_dir(tmp_path / "scores", scores, "acc-sgd-ie", run)
    Dataset.from_dict({"x": list(range(40)), "labels": [0, 1] * 20}).save_to_disk(str(scores_dir / "dataset"))
    config = tmp_path / "prune.yaml"
    config.write_text("drop_fraction: 0.25\n")
    out = tmp_path / "pruned"
    assert main(["prune", "--scores_dir", str(scores_dir), "--config", str(config), "--output_dir", str(out)]) == 0
    pruned = load_from_disk(str(out / "dataset"))
    assert pruned["x"] == sorted(np.argsort(scores)[10:].tolist())
    assert read_provenance(pruned)["columns"]["influence_acc_sgd_ie"]["method"] == "acc-sgd-ie"
    assert (out / "data.parquet").is_file() and "## Pruning" in (out / "README.md").read_text()

    assert main(["prune", "--scores_dir", str(scores_dir), "--drop_fraction", "1.5", "--output_dir", str(out)]) == 2
    assert "must lie in [0, 1)" in capsys.readouterr().err
    assert main(["prune", "--scores_dir", str(scores_dir), "--drop_fraction", "0.1", "--output_dir", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["prune", "--scores_dir", str(scores_dir), "--columns", "influence_x", "--keep_top", "3",
                       "--output_dir", str(tmp_path / "other")]) == 2
    assert "Unknown score column" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_a_config_key_typo_is_named(tmp_path, capsys):
    config = tmp_path / "prune.yaml"
    config.write_text("drop_fractoin: 0.25\n")
    assert main(["prune", f"--config={config}", "--dataset", str(tmp_path), "--output_dir", str(tmp_path / "o")]) == 2
    assert "Unknown key 'drop_fractoin'" in capsys.readouterr().err


def test_scores_without_a_dataset_directory_ask_for_the_dataset(tmp_path, capsys):
    """score_run from Python writes the score files only: the commands then need --dataset."""
    scores_dir = fake_scores_dir(tmp_path / "scores", np.zeros(4), "sgd-ie", fake_run_dir(tmp_path / "run"))
    assert main(["prune", "--scores_dir", str(scores_dir), "--drop_fraction", "0.25", "--output_dir", str(tmp_path / "o")]) == 2
    assert "holds no dataset/" in capsys.readouterr().err and not (tmp_path / "o").exists()
