"""The command table and its error policy: messages not tracebacks, --help everywhere, --config files, --version."""

import pytest

from hf_accinf import AccInfError, __version__
from hf_accinf.cli import COMMANDS, build_parser, main
from hf_accinf.commands import train
from hf_accinf.commands.parsing import parse


def test_user_errors_print_the_message_and_exit_2(tmp_path, capsys):
    assert main(["score", "--run_dir", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "is not an hf_accinf run directory" in err and "Traceback" not in err
    assert main(["summary", str(tmp_path)]) == 2
    assert main(["score", "--no_such_option", "1"]) == 2  # argparse's own usage error


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(AccInfError, match="not an hf_accinf run directory"):
        main(["score", "--run_dir", str(tmp_path), "--debug"])


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_listing_config(name, capsys):
    command = COMMANDS[name]  # one shape: NAME, DESCRIPTION, make_parser, main
    assert command.NAME == name and command.DESCRIPTION and callable(command.make_parser) and callable(command.main)
    assert main([name, "--help"]) == 0
    assert "--config YAML" in capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out and COMMANDS[name].DESCRIPTION[:30] in " ".join(out.split()) for name in COMMANDS)
    assert set(build_parser()[1].choices) == set(COMMANDS)
    assert main([]) == 2 and main(["no-such-command"]) == 2


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hf-accinf {__version__}"


def test_config_file_supplies_defaults_that_flags_override(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("model_type: vit\ndataset: embedded:digits\ntrain_rows: 10\nlearning_rate: 0.5\nmodules: [classifier]\n")
    _, source, training, recording = parse(train.make_parser(), [f"--config={config}", "--learning_rate", "0.25"])[:4]
    assert (source.train_rows, training.learning_rate, recording.modules) == (10, 0.25, ["classifier"])
    training = parse(train.make_parser(), ["--config", str(config)])[2]
    assert training.learning_rate == 0.5


def test_a_typo_in_a_config_key_is_named(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("train_rowz: 10\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "Unknown key 'train_rowz'" in capsys.readouterr().err
    with pytest.raises(AccInfError, match="Unknown key 'train_rowz'.*Did you mean 'train_rows'"):
        parse(train.make_parser(), ["--config", str(config)])


@pytest.mark.parametrize("flag, value", [("--score_kind", "linaer"), ("--schedule", "sweeep"), ("--removal", "exactly"),
                                         ("--correction", "sometimes")])
def test_unknown_choices_are_refused_before_any_work(flag, value, tmp_path, capsys):
    assert main(["score", "--run_dir", str(tmp_path), flag, value]) == 2
    assert f"Unknown {flag[2:]} '{value}'" in capsys.readouterr().err
