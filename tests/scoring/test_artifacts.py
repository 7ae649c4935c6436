"""The scoring output set: refused foreign directories, only own files replaced, all-or-nothing writes,
permissions from the umask, and metadata naming the run and the method."""

import os
import stat

import pytest
import torch

from hf_accinf import AccInfError, ScoreArguments
from hf_accinf.examples import digits_dataset, tiny_vit
from hf_accinf.scoring import load_embeddings, load_scores, load_summary, score_run
from hf_accinf.trajectory.schema import write_atomic
from tests.conftest import record_run

TRAIN, EVAL = dict(num_rows=48), dict(num_rows=20, offset=48)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("artifacts") / "run"
    record_run(tiny_vit(hidden_size=16), digits_dataset(**TRAIN), run, optim="sgd", learning_rate=0.1,
               per_device_train_batch_size=16, num_train_epochs=1)
    return run


def score(run_dir, output_dir, **options):
    options.setdefault("modules", ["head"])  # these tests are about the files, not the scope: the fast head
    args = ScoreArguments(run_dir=str(run_dir), output_dir=str(output_dir), **options)
    return score_run(args, digits_dataset(**TRAIN), digits_dataset(**EVAL), progress=False)


def test_metadata_names_the_library_run_method_and_modules(run_dir, tmp_path):
    result = score(run_dir, tmp_path / "s", modules=["weight"])
    summary = load_summary(tmp_path / "s")
    assert summary["hf_accinf_version"] and summary["run"]["num_steps"] == 3
    assert summary["method"] == "acc-sgd-ie" and summary["modules"] == ["weight"]
    assert sorted(summary["files"]) == ["dataset", "embeddings.safetensors", "scores.safetensors"]
    torch.testing.assert_close(load_scores(tmp_path / "s"), result.scores)
    assert list(load_embeddings(tmp_path / "s")) == ["weight"]


def test_a_foreign_non_empty_directory_is_refused_and_left_alone(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "mine"
    (out / "dataset").mkdir(parents=True)
    (out / "dataset" / "notes.txt").write_text("user data")
    (out / "scores.json").write_text("{}")
    monkeypatch.setattr("hf_accinf.scoring.run.estimate_influence", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(AccInfError, match="not empty and was not written by hf-accinf score.*--overwrite"):
        score(run_dir, out)
    assert (out / "dataset" / "notes.txt").read_text() == "user data" and (out / "scores.json").read_text() == "{}"


def test_overwrite_keeps_the_users_other_files(run_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("user data")
    score(run_dir, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "user data"
    assert load_summary(out)["method"] == "acc-sgd-ie"
    score(run_dir, out, method="sgd-ie")  # now a scoring output: replaced without --overwrite, notes kept
    assert load_summary(out)["method"] == "sgd-ie" and (out / "notes.txt").is_file()


def test_an_interrupted_write_leaves_the_previous_set_whole(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "s"
    score(run_dir, out, method="sgd-ie")
    before = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    old_scores = load_scores(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("hf_accinf.scoring.run.add_score_column", interrupted)  # the last file of the set
    with pytest.raises(KeyboardInterrupt):
        score(run_dir, out)
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == before
    assert load_summary(out)["method"] == "sgd-ie"
    torch.testing.assert_close(load_scores(out), old_scores)
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no staging directory left behind


def test_an_output_dir_that_is_a_file_is_refused_first(run_dir, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr("hf_accinf.scoring.run.estimate_influence", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(AccInfError, match="is a file"):
        score(run_dir, tmp_path / "file")


def test_files_honour_the_umask(run_dir, tmp_path):
    previous = os.umask(0o027)
    try:
        score(run_dir, tmp_path / "s")
        write_atomic(tmp_path / "manifest.json", lambda tmp: open(tmp, "w").write("{}"))  # the recorder's writes
    finally:
        os.umask(previous)
    for name in ("scores.safetensors", "embeddings.safetensors", "scores.json"):
        assert stat.S_IMODE((tmp_path / "s" / name).stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "manifest.json").stat().st_mode) == 0o640
