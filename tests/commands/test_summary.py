"""``hf-accinf summary RUN_DIR --check_replay``: the replay check of a run, from the recorded data source or from
``--train_data`` for runs not recorded by ``hf-accinf train``."""

import pytest

from hf_accinf import AccInfError
from hf_accinf.commands.summary import main, summary
from tests.conftest import record_digits_run


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("summary")
    run_dir, _ = record_digits_run(out, 64)  # an AccInfTrainer run: no recorded data source
    return run_dir, out / "train"


def test_check_replay_reads_train_data_and_reports_outputs_parameters_and_gauge(digits_run, capsys):
    run_dir, train = digits_run
    assert main([str(run_dir), "--check_replay", "--train_data", str(train), "--replay_tolerance", "1e-6"]) == 0
    text = capsys.readouterr().out
    assert "within the tolerance 1e-06" in text
    assert "outputs" in text and "parameters" in text and "optimizer state" in text
    # The tiny ViT's attention key biases are gauge tensors: reported apart, not judged.
    gauge_line = next(line for line in text.splitlines() if line.startswith("gauge tensors"))
    assert "2 left out" in gauge_line and "layers.0.attention.k_proj.bias" in gauge_line


def test_check_replay_without_train_data_needs_a_recorded_source(digits_run):
    run_dir, train = digits_run
    with pytest.raises(AccInfError, match="records no data source"):
        summary(run_dir, check_replay=True)
    with pytest.raises(AccInfError, match="--check_replay"):
        summary(run_dir, train_data=str(train))
    assert "replay" not in summary(run_dir)
