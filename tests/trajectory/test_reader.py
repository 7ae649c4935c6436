"""Reading runs back: parameters between checkpoints, and refusals of runs and datasets that do not fit."""

import json

import pytest
import torch

from hf_accinf import AccInfError, RunReader
from hf_accinf.examples import synthetic_text_dataset, tiny_bert
from hf_accinf.trajectory import schema
from tests.conftest import record_run


@pytest.fixture(scope="module")
def dense_and_sparse(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    data = synthetic_text_dataset(64)
    kwargs = dict(num_train_epochs=3, learning_rate=5e-4)
    record_run(tiny_bert(), data, root / "dense", recording={"checkpoint_every": 1}, **kwargs)
    record_run(tiny_bert(), data, root / "sparse", recording={"checkpoint_every": 8}, **kwargs)
    return RunReader(root / "dense"), RunReader(root / "sparse"), data


def test_parameters_between_checkpoints_match_a_dense_run(dense_and_sparse):
    dense, sparse, _ = dense_and_sparse
    assert dense.num_steps == sparse.num_steps == 24 and sparse.manifest.checkpoints == [0, 8, 16, 24]
    for step in range(dense.num_steps + 1):
        truth, rebuilt = dense.load_checkpoint(step), sparse.parameters_at(step)
        below, above = (step // 8) * 8, min(24, -(-step // 8) * 8)
        gap_lo, gap_hi = sparse.load_checkpoint(below), sparse.load_checkpoint(above)
        for name, value in truth.items():
            if name.startswith("classifier."):
                assert torch.equal(rebuilt[name], value), name  # the head is logged densely: exact
            elif value.is_floating_point():
                # Documented bound (docs/RECORDING.md): linear interpolation errs by at most half the
                # distance between the two checkpoints that bracket the step.
                error = (rebuilt[name] - value).norm()
                assert error <= 0.5 * (gap_hi[name] - gap_lo[name]).norm() + 1e-7, (name, step)


def test_dataset_of_another_length_or_fingerprint_is_refused(dense_and_sparse):
    dense, _, data = dense_and_sparse
    dense.check_dataset(data)
    with pytest.raises(AccInfError, match="has 63 rows but the run recorded 64"):
        dense.check_dataset(data.select(range(63)))
    with pytest.raises(AccInfError, match="rows differ from those the run was trained on"):
        dense.check_dataset(data.shuffle(seed=1))


def test_model_is_rebuilt_from_the_manifest(dense_and_sparse):
    dense, _, _ = dense_and_sparse
    model = dense.build_model()
    final = dense.load_checkpoint(dense.num_steps)
    assert torch.equal(model.classifier.weight, final["classifier.weight"])


def _copy_run(reader, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(reader.run_dir, target)
    return target


def test_newer_schema_is_refused(dense_and_sparse, tmp_path):
    run_dir = _copy_run(dense_and_sparse[0], tmp_path)
    manifest = json.loads((run_dir / schema.MANIFEST_NAME).read_text())
    manifest["schema_version"] = schema.SCHEMA_VERSION + 1
    (run_dir / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(AccInfError, match="newer than this hf_accinf"):
        RunReader(run_dir)


def test_run_with_missing_files_is_refused(dense_and_sparse, tmp_path):
    run_dir = _copy_run(dense_and_sparse[1], tmp_path)
    next((run_dir / schema.STEPS_DIR).iterdir()).unlink()
    with pytest.raises(AccInfError, match="incomplete; missing files"):
        RunReader(run_dir)


def test_directory_without_manifest_is_refused(tmp_path):
    with pytest.raises(AccInfError, match="not an hf_accinf run directory"):
        RunReader(tmp_path)


@pytest.mark.parametrize("damaged", ["manifest", "segment", "checkpoint"])
def test_truncated_files_are_named_with_the_fix(dense_and_sparse, tmp_path, damaged):
    run_dir = _copy_run(dense_and_sparse[1], tmp_path)
    path = {"manifest": run_dir / schema.MANIFEST_NAME, "segment": next((run_dir / schema.STEPS_DIR).iterdir()),
            "checkpoint": run_dir / schema.CHECKPOINTS_DIR / schema.checkpoint_dir_name(0) / schema.MODEL_WEIGHTS_NAME}[damaged]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(AccInfError, match=f"{path}.*(damaged|truncated).*again"):
        run = RunReader(run_dir)
        run.trajectory()
        run.load_checkpoint(0)
