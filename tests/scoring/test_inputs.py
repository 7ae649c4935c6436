"""What ``score_run`` accepts and refuses: non-finite trajectories, a model class from the training script,
plain torch datasets checked by content, and launched processes without a shard context."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ViTForImageClassification

from hf_accinf import AccInfError, RunReader, ScoreArguments
from hf_accinf.cli import main
from hf_accinf.examples import digits_dataset, tiny_vit
from hf_accinf.scoring import load_scores, score_run
from tests.conftest import record_run
from tests.launch import ROOT, launch_two_processes

TRAIN, EVAL = dict(num_rows=48), dict(num_rows=20, offset=48)


class ScriptViTForImageClassification(ViTForImageClassification):
    """A model class as a training script defines it: importable only inside that script."""


ScriptViTForImageClassification.__module__ = "__main__"


def make_script_model():
    return ScriptViTForImageClassification(tiny_vit(hidden_size=16).config)


class TorchRows(torch.utils.data.Dataset):
    """A plain torch dataset over digits rows, in the order given."""

    def __init__(self, order=None):
        self.rows = digits_dataset(**TRAIN)
        self.order = list(range(len(self.rows))) if order is None else order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, index):
        return self.rows[self.order[index]]


def record(run_dir, model=None, dataset=None):
    record_run(model or tiny_vit(hidden_size=16), dataset or digits_dataset(**TRAIN), run_dir, optim="sgd",
               learning_rate=0.1, per_device_train_batch_size=16, num_train_epochs=1)
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return record(tmp_path_factory.mktemp("inputs") / "run")


def test_a_non_finite_trajectory_is_refused_naming_the_step(run_dir, tmp_path):
    import shutil

    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    segment = next((broken / "steps").iterdir())
    tensors = load_file(segment)
    tensors["lr"][2] = float("nan")
    save_file(tensors, segment)
    with pytest.raises(AccInfError, match="non-finite learning rate at step 2"):
        score_run(ScoreArguments(run_dir=str(broken)), digits_dataset(**TRAIN), digits_dataset(**EVAL))


def test_a_model_class_from_the_training_script_is_passed_by_the_user(tmp_path):
    torch.manual_seed(0)
    run = record(tmp_path / "run", model=make_script_model())
    assert RunReader(run).manifest.model_class == "__main__.ScriptViTForImageClassification"
    args = ScoreArguments(run_dir=str(run), output_dir=str(tmp_path / "a"))
    with pytest.raises(AccInfError, match="cannot be imported.*model=.*--model package.module:factory"):
        score_run(args, digits_dataset(**TRAIN), digits_dataset(**EVAL))
    by_class = score_run(args, digits_dataset(**TRAIN), digits_dataset(**EVAL), model=ScriptViTForImageClassification, progress=False)
    digits_dataset(**TRAIN).save_to_disk(str(tmp_path / "train"))
    digits_dataset(**EVAL).save_to_disk(str(tmp_path / "eval"))
    assert main(["score", "--run_dir", str(run), "--train_data", str(tmp_path / "train"), "--eval_data", str(tmp_path / "eval"),
                 "--model", "tests.scoring.test_inputs:make_script_model", "--output_dir", str(tmp_path / "b")]) == 0
    torch.testing.assert_close(load_scores(tmp_path / "b"), by_class.scores)


def test_a_torch_dataset_is_checked_by_its_rows(tmp_path, caplog):
    run = record(tmp_path / "run", dataset=TorchRows())
    assert RunReader(run).manifest.dataset.content_hash
    args = ScoreArguments(run_dir=str(run), output_dir=str(tmp_path / "s"))
    shuffled = TorchRows(order=torch.randperm(48, generator=torch.Generator().manual_seed(0)).tolist())
    with pytest.raises(AccInfError, match="rows differ from those the run was trained on"):
        score_run(args, shuffled, digits_dataset(**EVAL))
    assert score_run(args, TorchRows(), digits_dataset(**EVAL), progress=False) is not None


def test_unreadable_rows_are_said_to_be_unchecked(run_dir, tmp_path, caplog):
    class Opaque(torch.utils.data.Dataset):
        def __len__(self):
            return 48

        def __getitem__(self, index):
            return object()

    with caplog.at_level("WARNING", logger="hf_accinf"):
        RunReader(run_dir).check_dataset(Opaque())
    assert "Only the length of the training dataset was checked" in caplog.text


@pytest.mark.slow
def test_launched_processes_without_a_shard_context_share_the_work(run_dir, tmp_path):
    out = tmp_path / "launched"
    launch_two_processes(ROOT / "tests/scripts/score_launched.py", run_dir, out)
    returned = [json.loads((out.parent / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in returned] == [2, 2]  # the two processes formed one group
    assert [r["result"] for r in returned] == [True, False]  # only the main process writes and returns
    single = score_run(ScoreArguments(run_dir=str(run_dir), output_dir=str(tmp_path / "single"), dtype="float64"),
                       digits_dataset(**TRAIN), digits_dataset(**EVAL), progress=False)
    torch.testing.assert_close(load_scores(out), single.scores, rtol=1e-10, atol=1e-15)
