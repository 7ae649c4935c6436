"""``hf-accinf report`` as a command: from a scoring output directory to report.md with its plots; and, from a
real small scoring run with ``--verify``, the report and the pruned dataset's card show the verify agreement, the
trust figures as tables and the recorded evaluation set, with the numbers of scores.json."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from hf_accinf.cli import main
from hf_accinf.commands import report
from hf_accinf.commands import train as train_command
from hf_accinf.examples import digits_dataset
from tests.data.helpers import fake_run_dir, fake_scores_dir

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def verified(tmp_path_factory):
    """A 64-row digits run recorded by `hf-accinf train` (AdamW, 2 steps), scored from its recorded source with
    --verify 4: the report and the card of its pruned dataset."""
    root = tmp_path_factory.mktemp("verified")
    assert train_command.main(["--config", str(CONFIGS / "digits_vit.yaml"), "--train_rows", "64", "--eval_rows", "32",
                               "--num_train_epochs", "1", "--disable_tqdm", "true", "--logging_strategy", "no",
                               "--output_dir", str(root)]) == 0
    scores = root / "scores"
    assert main(["score", "--run_dir", str(root / "accinf"), "--verify", "4", "--trust_probes", "2",
                 "--output_dir", str(scores)]) == 0
    assert main(["report", "--scores_dir", str(scores), "--output_dir", str(root / "report")]) == 0
    assert main(["prune", "--scores_dir", str(scores), "--drop_fraction", "0.25", "--output_dir", str(root / "pruned")]) == 0
    summary = json.loads((scores / "scores.json").read_text())
    return root, summary, (root / "report" / "report.md").read_text(), (root / "pruned" / "README.md").read_text()


def table_row(markdown: str, section: str, first_cell: str) -> list[str]:
    """The cells of the table row starting with ``first_cell`` in the section after heading text ``section``."""
    part = markdown.split(section, 1)[1].split("\n#", 1)[0]
    for line in part.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} under {section!r}")


def expected_verify_cells(check: dict) -> list[str]:
    ceiling = check["linearity_ceiling"]
    cells = [str(check["k"])] + [f"{value:.4g}" for value in (check["kendall_tau"], check["pearson_r"],
                                                                check["sign_agreement"], ceiling["kendall_tau"],
                                                                ceiling["pearson_r"])]
    low, high = check["kendall_tau_interval"]  # --verify writes tau's bootstrap interval beside it
    cells[1] += f" [{low:.4g}, {high:.4g}]"
    return cells


def test_the_report_shows_verify_and_trust_with_the_numbers_of_scores_json(verified):
    root, summary, markdown, _ = verified
    column, check, trust = f"`{summary['column']}`", summary["verify"], summary["trust"]
    assert check["k"] == 4 and len(check["estimate"]) == len(check["truth"]) == 4
    assert table_row(markdown, "Agreement with rows retrained out", column)[1:] == expected_verify_cells(check)
    assert "(verify.png)" in markdown and (root / "report" / "verify.png").read_bytes()[:4] == b"\x89PNG"
    growth = table_row(markdown, "## Trust figures", "tangent growth over the run (2-norm of M_T-1 ... M_0, a lower bound)")
    assert growth[1] == f"{trust['growth']:.4g}"
    if trust.get("embedding_ratio"):  # the forward form's per-row ratios (the default adjoint form has none)
        assert table_row(markdown, "## Trust figures", "row with the largest embedding ratio")[1] == \
            str(trust["embedding_ratio"]["argmax"])
    else:
        assert "largest embedding ratio" not in markdown
    assert not (root / "report" / "trust.png").exists()  # no row index drawn beside a growth factor
    evaluation = table_row(markdown, "## Score columns", column)[4]
    assert "embedded:digits" in evaluation and "32 rows" in evaluation


def test_the_card_names_the_evaluation_set_and_shows_verify_and_trust(verified):
    _, summary, _, card = verified
    column, check, trust = f"`{summary['column']}`", summary["verify"], summary["trust"]
    evaluation = table_row(card, "## Score columns", column)[6]
    assert evaluation.startswith("embedded:digits, rows held out of split 'train'") and "manifest.json" in evaluation
    assert summary["evaluation"]["source"] in evaluation and f"{summary['evaluation']['rows']} rows" in evaluation
    assert table_row(card, "agreement with rows retrained out", check and str(check["k"])) == expected_verify_cells(check)
    assert table_row(card, "trust figures", "expansive (the linearization is not to be trusted)")[1] == \
        ("yes" if trust["expansive"] else "no")
    assert table_row(card, "trust figures", "tangent growth up to the end of each epoch")[1] == \
        ", ".join(f"{g:.4g}" for g in trust["epoch_growth"])
    prose = card.split("```json")[0]
    assert "not recorded by the scoring run" not in prose and not re.search(r"\{'|\{\"", prose)  # no dict printed


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

    from transformers import HfArgumentParser

    root = argparse.ArgumentParser(prog="hf-accinf")
    subparsers = root.add_subparsers(dest="command", parser_class=HfArgumentParser)
    for module in (prune, push, report):
        module.make_parser(subparsers)
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--help"])
        assert exit_info.value.code == 0 and "--config" in capsys.readouterr().out
    assert root.parse_args(["push", "--repo_id", "user/x", "--dataset", "d"]).repo_id == "user/x"
