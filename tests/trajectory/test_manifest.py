"""The typed manifest (schema 3): written and read back unchanged, the untyped manifests of schema 1 and 2
converted on reading, one identity for resume and for the scores, and a run recorded under schema 2 still
scored."""

import json

import pytest
import torch

from hf_accinf import ScoreArguments
from hf_accinf.examples import digits_dataset, tiny_vit
from hf_accinf.recording.manifest import check_same_run
from hf_accinf.scoring import artifacts, score_run
from hf_accinf.trajectory import schema
from hf_accinf.trajectory.schema import DatasetSpec, LossSpec, Manifest, SchedulerSpec, TrainingSpec
from tests.conftest import record_run

TRAIN, EVAL = dict(num_rows=32), dict(num_rows=12, offset=32)

# The manifest entries a schema-2 recorder wrote (label smoothing twice, the scheduler's class under "class").
V2_ENTRIES = {
    "loss": {"kind": "cross_entropy", "label_smoothing": 0.1, "num_labels": 3},
    "scheduler": {"class": "LambdaLR", "lr_scheduler_type": "linear", "warmup_steps": 0},
    "training": {"max_grad_norm": 1.0, "gradient_accumulation_steps": 2, "per_device_train_batch_size": 8,
                 "world_size": 1, "seed": 42, "data_seed": None, "dataloader_drop_last": False,
                 "label_smoothing": 0.1, "num_train_epochs": 3.0, "max_steps": -1, "optim": "adamw_torch",
                 "learning_rate": 5e-5, "weight_decay": 0.0, "bf16": False, "fp16": True},
    "dataset": {"length": 64, "fingerprint": "abc", "content_hash": "f00d", "type": "Dataset",
                "source": {"dataset": "rows.csv", "modality": "text"}},
}


def v2_manifest(**entries) -> dict:
    head = {"module": "classifier", "parameters": {"weight": [3, 4]}, "chosen": ["weight"], "input_shape": [4],
            "input_dtype": "torch.float32", "param_groups": {"weight": 0}}
    return {"model_class": "m.Model", "model_config": {}, "head": head, "optimizer_class": "AdamW",
            "param_groups": [{"index": 0, "weight_decay": 0.0, "initial_lr": 5e-5}], "libraries": {},
            "checkpoint_every": 1, "numerics": {}, "schema_version": 2, "status": "complete", "num_steps": 4,
            "segments": [[0, 4]], "checkpoints": [0, 4], **{**V2_ENTRIES, **entries}}


def test_a_schema_2_manifest_is_read_as_the_typed_manifest():
    manifest = Manifest.from_dict(v2_manifest())
    assert manifest.loss == LossSpec(num_labels=3, label_smoothing=0.1)
    assert manifest.scheduler == SchedulerSpec("LambdaLR", "linear", 0)
    assert manifest.dataset == DatasetSpec(64, "abc", "f00d", "Dataset", {"dataset": "rows.csv", "modality": "text"})
    assert isinstance(manifest.training, TrainingSpec) and manifest.training.max_grad_norm == 1.0
    assert manifest.training.mixed_precision and not hasattr(manifest.training, "label_smoothing")
    assert manifest.schema_version == 2  # what it was recorded with: replay and scoring decide on it


def test_the_typed_manifest_round_trips_through_its_dict():
    manifest = Manifest.from_dict(v2_manifest())
    manifest.schema_version = schema.SCHEMA_VERSION
    data = json.loads(json.dumps(manifest.to_dict()))
    assert "label_smoothing" not in data["training"] and data["loss"]["label_smoothing"] == 0.1
    assert Manifest.from_dict(data) == manifest


def test_identity_ignores_what_a_reload_changes_and_sees_what_makes_another_run():
    base = Manifest.from_dict(v2_manifest())
    reloaded = Manifest.from_dict(v2_manifest(dataset={**V2_ENTRIES["dataset"], "fingerprint": "other"}))
    reloaded.head.input_shape, reloaded.schema_version = [5], schema.SCHEMA_VERSION
    assert reloaded.identity() == base.identity()
    check_same_run(base, reloaded)
    smoothed = Manifest.from_dict(v2_manifest(loss={**V2_ENTRIES["loss"], "label_smoothing": 0.2}))
    with pytest.raises(Exception, match="loss differs"):
        check_same_run(base, smoothed)


def _as_schema_2(data: dict) -> dict:
    """A schema-3 manifest dict written back the way a schema-2 recorder wrote it."""
    data = dict(data, schema_version=2)
    data["training"] = dict(data["training"], label_smoothing=data["loss"]["label_smoothing"])
    scheduler = dict(data["scheduler"])
    data["scheduler"] = {"class": scheduler.pop("class_name"), **scheduler}
    return data


def test_a_run_recorded_under_schema_2_keeps_scoring(tmp_path):
    run = tmp_path / "run"
    record_run(tiny_vit(hidden_size=16), digits_dataset(**TRAIN), run, optim="sgd", learning_rate=0.1,
               per_device_train_batch_size=16, num_train_epochs=1)
    args = dict(run_dir=str(run), modules=["head"], method="sgd-ie")
    current = score_run(ScoreArguments(output_dir=str(tmp_path / "v3"), **args), digits_dataset(**TRAIN),
                        digits_dataset(**EVAL), progress=False)
    path = run / schema.MANIFEST_NAME
    path.write_text(json.dumps(_as_schema_2(json.loads(path.read_text()))))
    old = score_run(ScoreArguments(output_dir=str(tmp_path / "v2"), **args), digits_dataset(**TRAIN),
                    digits_dataset(**EVAL), progress=False)
    torch.testing.assert_close(old.scores, current.scores, rtol=0, atol=0)
    identity = artifacts.read_summary(tmp_path / "v2").run
    assert identity.dataset_length == TRAIN["num_rows"] and identity.model_class.endswith("ViTForImageClassification")
    assert identity.manifest_sha256 == artifacts.manifest_sha256(run)
