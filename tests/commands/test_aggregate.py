"""``hf-accinf score --num_partitions P --partition i`` then ``hf-accinf aggregate``: the artifact set and the dataset
column of one job; missing partitions and partitions of other arguments named; a partition already written skipped."""

import pytest
import torch
from safetensors.torch import load_file

from hf_accinf.cli import main
from hf_accinf.data.columns import load_scored_dataset
from tests.conftest import record_digits_run


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    return record_digits_run(tmp_path_factory.mktemp("aggregate"), 40)


def _score(run_dir, data, output_dir, *options):
    return main(["score", "--run_dir", str(run_dir), "--modules", "head", "--method", "sgd-ie", "--form", "forward",
                 "--trust_probes", "0", "--output_dir", str(output_dir), *data, *options])


def test_partitions_aggregate_into_the_set_and_column_of_one_job(recorded, tmp_path, capsys):
    run_dir, data = recorded
    assert _score(run_dir, data, tmp_path / "whole") == 0
    parts = tmp_path / "parts"
    for index in (0, 2):
        assert _score(run_dir, data, parts, "--num_partitions", "3", "--partition", str(index)) == 0
    assert "hf-accinf aggregate --output_dir" in capsys.readouterr().out
    assert main(["aggregate", "--output_dir", str(parts), "--train_data", data[1]]) == 2
    assert "Partitions [1] of 3 are missing" in capsys.readouterr().err

    shard = next(parts.glob("scores.part-00000-of-00003.safetensors"))
    written = shard.stat().st_mtime_ns
    assert _score(run_dir, data, parts, "--num_partitions", "3", "--partition", "0") == 0  # a rerun: skipped
    assert "already written" in capsys.readouterr().err and shard.stat().st_mtime_ns == written
    assert _score(run_dir, data, parts, "--num_partitions", "3", "--partition", "1", "--removal", "first-order") == 2
    assert "other arguments" in capsys.readouterr().err  # partition 1 of other arguments than 0 and 2: refused
    assert _score(run_dir, data, parts, "--num_partitions", "3", "--partition", "1") == 0

    assert main(["aggregate", "--output_dir", str(parts), "--train_data", data[1]]) == 0
    whole, combined = (load_file(d / "scores.safetensors")["scores"] for d in (tmp_path / "whole", parts))
    assert (combined - whole).abs().max() <= 1e-10 * whole.abs().max()
    embeddings = load_file(parts / "embeddings.safetensors")
    assert all(value.shape[0] == 40 for value in embeddings.values())
    torch.testing.assert_close(torch.tensor(load_scored_dataset(parts)["influence_sgd_ie"], dtype=torch.float64),
                               combined)
    assert sorted(p.name for p in parts.iterdir()) == ["dataset", "embeddings.safetensors", "scores.json",
                                                      "scores.safetensors"]
    # Once aggregated, a rerun of a partition is skipped too.
    assert _score(run_dir, data, parts, "--num_partitions", "3", "--partition", "1") == 0
    assert "already holds the aggregated scores" in capsys.readouterr().err


def test_the_adjoint_form_is_refused_and_nothing_to_aggregate_is_named(recorded, tmp_path, capsys):
    run_dir, data = recorded
    assert main(["score", "--run_dir", str(run_dir), "--modules", "head", "--method", "sgd-ie", "--form", "adjoint",
                 "--num_partitions", "2", "--output_dir", str(tmp_path / "adjoint"), *data]) == 2
    assert "the adjoint form cannot be split" in capsys.readouterr().err
    assert main(["aggregate", "--output_dir", str(tmp_path / "adjoint")]) == 2
    assert "No finished partitions" in capsys.readouterr().err


@pytest.mark.slow
def test_a_partition_launched_on_two_processes_equals_the_partition_in_one(recorded, tmp_path):
    """Under ``accelerate launch`` (2 processes, gloo) the processes split the partition's rows again by rank: the
    shard written equals the one process's, rows, scores and embeddings."""
    import json

    from tests.launch import ROOT, launch_two_processes

    run_dir, data = recorded
    command = ["score", "--run_dir", str(run_dir), "--modules", "head", "--method", "sgd-ie",
               "--form", "forward", "--trust_probes", "0", *data, "--num_partitions", "2", "--partition", "1"]
    launch_two_processes(ROOT / "tests/scripts/score_launched.py", "--cli", tmp_path, *command, "--cpu", "true",
                         "--output_dir", tmp_path / "launched")
    assert [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)] == \
        [{"status": 0, "world_size": 2}] * 2
    from hf_accinf.cli import main as cli

    assert cli([*command, "--output_dir", str(tmp_path / "single")]) == 0
    name = "scores.part-00001-of-00002.safetensors"
    launched, single = (load_file(tmp_path / d / name) for d in ("launched", "single"))
    assert set(launched) == set(single) and torch.equal(launched["rows"], torch.arange(20, 40))
    for key, value in single.items():
        assert (launched[key] - value).abs().max() <= 1e-10 * value.abs().max(), key
