"""The scoring output set: refused foreign directories, only own files replaced, all-or-nothing writes,
permissions from the umask, metadata naming the run and the method, reruns of other runs or arguments
refused, and outputs written in shards completed later."""

import hashlib
import json
import os
import stat

import pytest
import torch

from hf_accinf import AccInfError, ScoreArguments
from hf_accinf.examples import digits_dataset, tiny_vit
from hf_accinf.io import write_atomic
from hf_accinf.scoring import artifacts, load_embeddings, load_scores, read_summary, score_run
from hf_accinf.trajectory.schema import content_hash
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
    summary = read_summary(tmp_path / "s")
    assert summary == result.summary and summary.format_version == artifacts.FORMAT_VERSION
    assert summary.hf_accinf_version and summary.run.num_steps == 3 and summary.run.run_dir == str(run_dir)
    assert summary.run.manifest_sha256 == hashlib.sha256((run_dir / "manifest.json").read_bytes()).hexdigest()
    assert summary.method == "acc-sgd-ie" and summary.modules == ["weight"] and summary.column == "influence_acc_sgd_ie"
    assert summary.evaluation.rows == EVAL["num_rows"]
    assert summary.evaluation.content_hash == content_hash(digits_dataset(**EVAL))
    assert summary.files == ["embeddings.safetensors", "scores.safetensors"]  # no dataset/: the command writes it
    assert summary.gauge == [] and summary.verify is None and summary.trust["growth"] > 0
    torch.testing.assert_close(load_scores(tmp_path / "s"), result.scores)
    assert list(load_embeddings(tmp_path / "s")) == ["weight"]
    saved = json.loads((tmp_path / "s" / "scores.json").read_text())
    assert artifacts.ScoreSummary.from_dict(saved) == summary and summary.to_dict() == saved


def test_a_format_1_summary_is_read(tmp_path):
    """The summary of the previous format (no manifest hash, the evaluation row count only) is read, and a rerun
    checks what it recorded."""
    version_1 = {
        "format": "hf_accinf.scores", "format_version": 1, "hf_accinf_version": "0.1.0",
        "run": {"run_dir": "r", "model_class": "M", "num_steps": 3, "dataset_content_hash": "h", "dataset_length": 48},
        "method": "sgd-ie", "removal": "exact", "modules": None, "column": "influence_sgd_ie", "scope": ["w"],
        "backend": "head", "evaluation_rows": 20, "arguments": {"method": "sgd-ie", "form": "auto"}, "form": "adjoint",
        "trust": None, "verify": None, "replay": None, "projection": None, "schedule": "backward", "seconds": 1.0,
        "cost_model": None, "most_harmful": [1], "most_helpful": [2], "files": ["scores.safetensors"]}
    summary = artifacts.ScoreSummary.from_dict(version_1)
    assert summary.run.manifest_sha256 is None and summary.evaluation.rows == 20 and summary.scope == ["w"]
    assert summary.format_version == 1 and summary.extra == {} and summary.gauge == []
    request = artifacts.rerun_key("abc", {"method": "sgd-ie", "form": "auto"}, artifacts.EvaluationSet(20, "h"))
    assert request == {**summary.rerun_key(), "run manifest sha256": "abc", "evaluation rows' sha256": "h"}
    (tmp_path / "scores.json").write_text(json.dumps(version_1))
    artifacts.check_rerun(tmp_path, request)  # what version 1 did not record is not compared
    with pytest.raises(AccInfError, match="evaluation rows 20 there, 21 now"):
        artifacts.check_rerun(tmp_path, {**request, "evaluation rows": 21})
    with pytest.raises(AccInfError, match="newer than this hf_accinf reads"):
        artifacts.ScoreSummary.from_dict({**version_1, "format_version": artifacts.FORMAT_VERSION + 1})
    with pytest.raises(AccInfError, match="not written by hf-accinf score"):
        artifacts.ScoreSummary.from_dict({"method": "sgd-ie"})


def test_a_foreign_non_empty_directory_is_refused_and_left_alone(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "mine"
    (out / "dataset").mkdir(parents=True)
    (out / "dataset" / "notes.txt").write_text("user data")
    (out / "scores.json").write_text("{}")
    monkeypatch.setattr("hf_accinf.scoring.forms.estimate_influence", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(AccInfError, match="not empty and was not written by hf-accinf score.*--overwrite"):
        score(run_dir, out)
    assert (out / "dataset" / "notes.txt").read_text() == "user data" and (out / "scores.json").read_text() == "{}"


def test_overwrite_keeps_the_users_other_files(run_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("user data")
    score(run_dir, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "user data"
    assert read_summary(out).method == "acc-sgd-ie"
    score(run_dir, out, trust_probes=0)  # now a scoring output: the same arguments replace it, notes kept
    assert read_summary(out).trust is None and (out / "notes.txt").is_file()
    score(run_dir, out, method="sgd-ie", overwrite=True)  # other arguments: with --overwrite
    assert read_summary(out).method == "sgd-ie" and (out / "notes.txt").is_file()


def test_a_rerun_of_another_run_or_other_arguments_is_refused_unless_overwrite(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "s"
    score(run_dir, out, method="sgd-ie", trust_probes=0)
    first = load_scores(out)
    score(run_dir, out, method="sgd-ie", trust_probes=1)  # same arguments that matter: replaced silently
    assert read_summary(out).trust is not None
    started = []
    monkeypatch.setattr("hf_accinf.scoring.forms.estimate_influence", lambda *a, **k: started.append(1) or pytest.fail())
    for options, named in [(dict(method="acc-sgd-ie"), "method 'sgd-ie' there, 'acc-sgd-ie' now"),
                           (dict(method="sgd-ie", removal="first-order"), "removal"),
                           (dict(method="sgd-ie", dtype="float32"), "dtype"),
                           (dict(method="sgd-ie", modules=["weight"]), "modules"),
                           (dict(method="sgd-ie", form="forward"), "form"),
                           (dict(method="sgd-ie", projection_dim=8), "projection_dim")]:
        with pytest.raises(AccInfError, match=f"{named}.*--overwrite"):
            score(run_dir, out, **options)
    with pytest.raises(AccInfError, match="evaluation rows' sha256"):
        score_run(ScoreArguments(run_dir=str(run_dir), output_dir=str(out), method="sgd-ie"), digits_dataset(**TRAIN),
                  digits_dataset(num_rows=20, offset=68), progress=False)
    other = tmp_path / "other"  # another run: another learning rate, another manifest
    record_run(tiny_vit(hidden_size=16), digits_dataset(**TRAIN), other, optim="sgd", learning_rate=0.05,
               per_device_train_batch_size=16, num_train_epochs=1)
    with pytest.raises(AccInfError, match="run manifest sha256.*--overwrite"):
        score(other, out, method="sgd-ie")
    assert started == [] and torch.equal(load_scores(out), first)
    monkeypatch.undo()
    score(run_dir, out, method="acc-sgd-ie", overwrite=True)
    assert read_summary(out).method == "acc-sgd-ie"


def test_an_interrupted_write_leaves_the_previous_set_whole(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "s"
    score(run_dir, out, method="sgd-ie")
    before = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    old_scores = load_scores(out)
    from safetensors.torch import save_file

    def interrupted(tensors, path, metadata=None):  # the embeddings are written after the scores
        if "embeddings" in str(path):
            raise KeyboardInterrupt
        save_file(tensors, path, metadata=metadata)
    monkeypatch.setattr("hf_accinf.scoring.run.save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        score(run_dir, out, overwrite=True)
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == before
    assert read_summary(out).method == "sgd-ie"
    torch.testing.assert_close(load_scores(out), old_scores)
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no staging directory left behind


def test_an_output_dir_that_is_a_file_is_refused_first(run_dir, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr("hf_accinf.scoring.forms.estimate_influence", lambda *a, **k: pytest.fail("work started"))
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


def test_an_output_written_in_shards_is_completed_by_aggregate(tmp_path):
    """Each shard holds a partition of the rows (any order); a shard without its marker is unfinished; the
    aggregate holds every row once, in row order, and the set written from it supersedes the shards."""
    out, rows = tmp_path / "s", 10
    scores = torch.randn(rows, dtype=torch.float64)
    embeddings = torch.randn(rows, 3, 2, dtype=torch.float64)
    parts = torch.randperm(rows, generator=torch.Generator().manual_seed(0)).split([4, 3, 3])
    assert artifacts.pending_shards(out, 3) == [0, 1, 2]
    for index in (2, 0):
        artifacts.write_scores_shard(out, index, 3, parts[index], scores[parts[index]], {"weight": embeddings[parts[index]]})
    artifacts.check_output_dir(out)  # shards alone: a scoring output in progress, not a foreign directory
    unfinished = artifacts.write_scores_shard(out, 1, 3, parts[1], scores[parts[1]], {"weight": embeddings[parts[1]]})
    (out / (unfinished.name + ".done")).unlink()  # interrupted between the shard and its marker
    assert artifacts.pending_shards(out, 3) == [1]
    with pytest.raises(AccInfError, match=r"Shards \[1\] of 3 .* not finished"):
        artifacts.aggregate(out, 3, rows)
    artifacts.write_scores_shard(out, 1, 3, parts[1], scores[parts[1]], {"weight": embeddings[parts[1]]})
    merged, merged_embeddings = artifacts.aggregate(out, 3, rows)
    assert torch.equal(merged, scores) and torch.equal(merged_embeddings["weight"], embeddings)
    with pytest.raises(AccInfError, match="do not cover the 11 rows once each"):
        artifacts.aggregate(out, 3, rows + 1)

    summary = artifacts.ScoreSummary(artifacts.RunIdentity("run"), "sgd-ie", "influence_sgd_ie")
    from safetensors.torch import save_file
    artifacts.write_set(out, {artifacts.SCORES_NAME: lambda path: save_file({"scores": merged}, path)}, summary)
    assert sorted(p.name for p in out.iterdir()) == ["scores.json", "scores.safetensors"]
    assert torch.equal(load_scores(out), scores)


def test_a_shard_with_rows_of_another_size_is_refused(tmp_path):
    with pytest.raises(AccInfError, match="give one value per row"):
        artifacts.write_scores_shard(tmp_path, 0, 2, torch.arange(3), torch.zeros(4))
    with pytest.raises(AccInfError, match="must lie in"):
        artifacts.write_scores_shard(tmp_path, 2, 2, torch.arange(3), torch.zeros(3))
