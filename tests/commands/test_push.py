"""``hf-accinf push`` against a local stand-in for the Hub: the uploaded parquet rows and card are exactly the
scored dataset's. The push runs in a subprocess because huggingface_hub and datasets read ``HF_ENDPOINT`` when
imported; ``HF_HUB_DISABLE_XET=1`` (huggingface_hub's documented switch) selects the plain LFS upload."""

import io
import json
import sys

import numpy as np
import pyarrow.parquet as pq
import yaml
from datasets import Dataset

from hf_accinf.data.columns import attach_scores, read_provenance
from hf_accinf.data.hub import write_scored_dataset
from tests.data.fake_hub import FakeHub
from tests.data.helpers import fake_run_dir, fake_scores_dir
from tests.launch import run_command, subprocess_env


def test_push_uploads_the_rows_and_the_card(tmp_path):
    scores = np.random.default_rng(3).normal(size=12)
    run = fake_run_dir(tmp_path / "run")
    data = Dataset.from_dict({"text": [f"example {i}" for i in range(12)], "labels": [i % 2 for i in range(12)]})
    data = attach_scores(data, fake_scores_dir(tmp_path / "scores", scores, "acc-sgd-ie", run, trust={"kendall_tau": 0.8}))
    scored = write_scored_dataset(data, tmp_path / "scored")
    with FakeHub() as hub:
        env = subprocess_env(HF_ENDPOINT=hub.endpoint, HF_TOKEN="hf_test_token", HF_HUB_DISABLE_XET="1",
                   HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HOME=str(tmp_path / "home"))
        run_command([sys.executable, "-m", "hf_accinf.commands.push", "--dataset", str(scored),
                     "--repo_id", "user/scored-data"], env=env)
        files = hub.repos["user/scored-data"]

    shards = [name for name in files if name.endswith(".parquet")]
    assert shards == ["data/train-00000-of-00001.parquet"]
    table = pq.read_table(io.BytesIO(files[shards[0]]))
    assert table.column("text").to_pylist() == data["text"] and table.column("labels").to_pylist() == data["labels"]
    np.testing.assert_array_equal(table.column("influence_acc_sgd_ie").to_numpy(), scores)

    card = files["README.md"].decode()
    header = yaml.safe_load(card.split("---")[1])
    assert "hf-accinf" in header["tags"]  # our header, kept by push_to_hub
    assert header["dataset_info"]["splits"][0]["num_examples"] == 12  # and push_to_hub's additions
    assert "`influence_acc_sgd_ie`" in card and "< 0 harmful" in card and "| kendall_tau | 0.8 |" in card
    assert json.loads(card.split("```json")[1].split("```")[0]) == read_provenance(data)
    assert not any("xet" in request.lower() for request in hub.requests)
