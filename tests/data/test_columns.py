"""Score columns with provenance: attached from scoring outputs, written with save_to_disk, parquet and a card,
and read back unchanged."""

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from datasets import Dataset, load_from_disk

from hf_accinf import AccInfError
from hf_accinf.data.columns import PROVENANCE_KEY, add_score_column, attach_scores, read_provenance, score_columns
from hf_accinf.data.hub import write_scored_dataset
from hf_accinf.scoring.artifacts import load_score_artifact
from tests.data.helpers import fake_run_dir, fake_scores_dir


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("columns")
    run = fake_run_dir(root / "run")
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=30), rng.normal(size=30)
    data = Dataset.from_dict({"text": [f"row {i}" for i in range(30)], "labels": (np.arange(30) % 3).tolist()})
    data.info.description = "The user's own description."
    data = attach_scores(data, fake_scores_dir(root / "a", first, "sgd-ie", run))
    data = attach_scores(data, fake_scores_dir(root / "b", second, "acc-sgd-ie", run, trust={"kendall_tau": 0.9}))
    return root, run, data, first, second


def test_each_scoring_run_becomes_a_column_with_its_provenance(scored):
    root, run, data, first, second = scored
    assert score_columns(data) == ["influence_sgd_ie", "influence_acc_sgd_ie"]
    np.testing.assert_array_equal(np.asarray(data["influence_sgd_ie"]), first)
    np.testing.assert_array_equal(np.asarray(data["influence_acc_sgd_ie"]), second)
    columns = read_provenance(data)["columns"]
    manifest_sha = hashlib.sha256((run / "manifest.json").read_bytes()).hexdigest()
    assert columns["influence_acc_sgd_ie"]["method"] == "acc-sgd-ie"
    assert columns["influence_acc_sgd_ie"]["run"] == {"run_dir": str(run), "manifest_sha256": manifest_sha}
    assert columns["influence_acc_sgd_ie"]["evaluation"]["source"] == "a stand-in evaluation set"
    assert columns["influence_acc_sgd_ie"]["trust"] == {"kendall_tau": 0.9}
    assert columns["influence_sgd_ie"]["score_kind"] == "linear" and columns["influence_sgd_ie"]["trust"] is None
    assert "< 0 harmful" in columns["influence_sgd_ie"]["sign"]
    assert data.info.description.startswith("The user's own description.")


def test_round_trip_through_save_to_disk_parquet_and_card(scored, tmp_path):
    _, _, data, first, second = scored
    target = write_scored_dataset(data, tmp_path / "out")
    reloaded = load_from_disk(str(target / "dataset"))
    assert reloaded["text"] == data["text"]
    np.testing.assert_array_equal(np.asarray(reloaded["influence_acc_sgd_ie"]), second)
    assert read_provenance(reloaded) == read_provenance(data)

    table = pq.read_table(target / "data.parquet")
    assert table.column("labels").to_pylist() == data["labels"]
    np.testing.assert_array_equal(table.column("influence_sgd_ie").to_numpy(), first)
    assert json.loads(table.schema.metadata[PROVENANCE_KEY.encode()]) == read_provenance(data)
    assert np.array_equal(np.asarray(Dataset.from_parquet(str(target / "data.parquet"))["influence_sgd_ie"]), first)

    card = (target / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert "hf-accinf" in header["tags"]
    assert "`influence_sgd_ie`" in card and "`influence_acc_sgd_ie`" in card and "< 0 harmful" in card
    assert json.loads(card.split("```json")[1].split("```")[0]) == read_provenance(data)


def test_the_output_set_is_replaced_as_a_whole_and_foreign_directories_are_refused(scored, tmp_path):
    _, _, data, _, _ = scored
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(AccInfError, match="not empty"):
        write_scored_dataset(data, foreign)
    with pytest.raises(AccInfError, match="not written by hf_accinf"):
        write_scored_dataset(data, foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    target = write_scored_dataset(data, tmp_path / "own")
    write_scored_dataset(data.select(range(5)), target, overwrite=True)
    assert len(load_from_disk(str(target / "dataset"))) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "own"]  # no staging leftovers


def test_the_manifest_hash_is_the_one_taken_at_scoring_time(tmp_path):
    """A column names the run as it was scored: a manifest changed afterwards does not change the provenance."""
    run = fake_run_dir(tmp_path / "run")
    scored_sha = hashlib.sha256((run / "manifest.json").read_bytes()).hexdigest()
    directory = fake_scores_dir(tmp_path / "s", np.zeros(3), "sgd-ie", run)
    (run / "manifest.json").write_text("{}")
    data = attach_scores(Dataset.from_dict({"labels": [0, 1, 0]}), directory)
    assert read_provenance(data)["columns"]["influence_sgd_ie"]["run"]["manifest_sha256"] == scored_sha


def test_bad_score_inputs_are_refused_with_the_path(tmp_path):
    data = Dataset.from_dict({"labels": [0, 1, 0]})
    with pytest.raises(AccInfError, match="2 scores for a dataset of 3 rows"):
        add_score_column(data, [0.1, 0.2], "influence_x")
    with pytest.raises(AccInfError, match=f"No scores at {tmp_path}"):
        attach_scores(data, tmp_path)
    scores_dir = fake_scores_dir(tmp_path / "s", np.zeros(3), "sgd-ie", fake_run_dir(tmp_path / "run"))
    (scores_dir / "scores.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(AccInfError, match=str(scores_dir / "scores.safetensors")):
        load_score_artifact(scores_dir)
