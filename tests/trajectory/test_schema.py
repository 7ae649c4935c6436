"""The content hash that identifies a training dataset: rows and order, never metadata or fingerprints."""

import torch
from datasets import Dataset, load_from_disk

from hf_accinf.trajectory.schema import content_hash


def tokenized(texts):
    rows = Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(len(texts))]})
    return rows.map(lambda batch: {"input_ids": [[len(word) for word in t.split()] for t in batch["text"]]}, batched=True)


def test_a_dataset_saved_and_reloaded_keeps_its_hash(tmp_path):
    data = tokenized(["a bb ccc", "dddd e", "ff ggg hh i"])
    data.save_to_disk(str(tmp_path / "d"))
    reloaded = load_from_disk(str(tmp_path / "d"))
    assert reloaded._fingerprint != data._fingerprint
    assert content_hash(reloaded) == content_hash(data) == content_hash(data.with_format("torch"))


def test_the_hash_is_strict_on_order_and_content():
    data = tokenized(["a bb ccc", "dddd e", "ff ggg hh i"])
    assert content_hash(data.select([1, 0, 2])) != content_hash(data)
    assert content_hash(tokenized(["a bb ccc", "dddd e", "ff ggg hh j"])) != content_hash(data)


def test_torch_datasets_are_hashed_by_their_row_tensors():
    class Rows(torch.utils.data.Dataset):
        def __init__(self, values):
            self.values = values

        def __len__(self):
            return len(self.values)

        def __getitem__(self, index):
            return {"pixel_values": torch.full((2, 2), float(self.values[index])), "labels": self.values[index] % 3}

    assert content_hash(Rows([1, 2, 3])) == content_hash(Rows([1, 2, 3]))
    assert content_hash(Rows([1, 2, 3])) != content_hash(Rows([2, 1, 3]))
    assert content_hash(Rows(list(range(10_000)))) != content_hash(Rows(list(range(9_999)) + [5]))


def test_rows_that_read_differently_each_time_get_no_hash():
    class Augmented(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return {"pixel_values": torch.rand(2, 2), "labels": index % 2}

    assert content_hash(Augmented()) is None
