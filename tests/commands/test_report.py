"""``hf-accinf report`` as a command: from a scoring output directory to report.md with its plots."""

import numpy as np

from hf_accinf.cli import main
from hf_accinf.commands import report
from hf_accinf.examples import digits_dataset
from tests.data.helpers import fake_run_dir, fake_scores_dir


def test_report_command_writes_the_report_and_refuses_bad_truth(tmp_path, capsys):
    scores = np.random.default_rng(4).normal(size=30)
    scores_dir = fake_scores_dir(tmp_path / "scores", scores, "acc-sgd-ie", fake_run_dir(tmp_path / "run"))
    digits_dataset(30).save_to_disk(str(scores_dir / "dataset"))
    np.save(tmp_path / "truth.npy", scores + 0.1)
    out = tmp_path / "report"
    assert main(["report", "--scores_dir", str(scores_dir), "--output_dir", str(out), "--truth", str(tmp_path / "truth.npy")]) == 0
    text = (out / "report.md").read_text()
    assert "acc-sgd-ie" in text and "(truth.png)" in text and (out / "truth.png").is_file()
    assert main(["report", "--scores_dir", str(scores_dir), "--output_dir", str(tmp_path / "r2"),
                        "--truth", str(tmp_path / "missing.npy")]) == 2
    assert "missing.npy does not exist" in capsys.readouterr().err


def test_the_commands_register_as_subcommands_and_print_help(capsys):
    import argparse

    import pytest

    from hf_accinf.commands import prune, push

    root = argparse.ArgumentParser(prog="hf-accinf")
    subparsers = root.add_subparsers(dest="command")
    for module in (prune, push, report):
        module.make_parser(subparsers)
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--help"])
        assert exit_info.value.code == 0 and "--config" in capsys.readouterr().out
    assert root.parse_args(["push", "--repo_id", "user/x", "--dataset", "d"]).repo_id == "user/x"
