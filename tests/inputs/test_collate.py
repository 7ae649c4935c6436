"""The one Trainer-style collator: the columns ``forward`` takes, the label renamed, dynamic padding."""

import pytest
import torch

from hf_accinf.errors import AccInfError
from hf_accinf.examples import tiny_bert
from hf_accinf.inputs.collate import TrainerStyleCollator, eval_collator, model_collator, model_input_names


def rows():
    return [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "label": 1, "text": "a b c", "idx": 0},
            {"input_ids": [8], "attention_mask": [1], "label": 0, "text": "d", "idx": 1}]


def test_without_a_collator_unused_columns_go_labels_are_renamed_and_sequences_padded():
    batch = TrainerStyleCollator({"input_ids", "attention_mask", "label"}, pad_token_id=3)(rows())
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]          # the model's pad token
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]     # masked out
    assert batch["labels"].tolist() == [1, 0]


def test_a_given_collator_sees_the_kept_columns_as_the_trainer_hands_them():
    seen = []
    model = tiny_bert()
    model_collator(model, lambda batch: seen.append(batch) or {})(rows())
    assert seen[0] == [{k: v for k, v in row.items() if k in ("input_ids", "attention_mask", "label")} for row in rows()]
    assert {"input_ids", "attention_mask", "token_type_ids", "labels", "label", "label_ids"} <= model_input_names(model)


def test_the_evaluation_collator_pads_with_the_models_pad_token_and_keeps_a_user_collator():
    model = tiny_bert()
    batch = eval_collator(model)(rows())
    pad = model.config.pad_token_id or 0
    assert batch["input_ids"][1].tolist() == [8, pad, pad] and "text" not in batch
    user = lambda batch: {"n": torch.tensor(len(batch))}  # noqa: E731
    assert eval_collator(model, collate_fn=user) is user


def test_rows_that_are_not_dicts_are_refused_with_the_fix():
    with pytest.raises(AccInfError, match="Rows must be dicts"):
        TrainerStyleCollator({"x"})([(torch.zeros(2), 1)])
