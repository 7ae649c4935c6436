"""The one evaluation-input runner: labelled batches in order, the head's inputs as the model computes them,
and the refusals (no label column, no rows, labels outside the classes)."""

import pytest
import torch

from hf_accinf.errors import AccInfError
from hf_accinf.examples import digits_dataset, tiny_vit
from hf_accinf.inputs.collate import eval_collator
from hf_accinf.inputs.evaluation import check_eval_labels, evaluation_batches, head_inputs, labelled_batches


def test_head_inputs_are_what_the_head_sees_in_eval_mode_in_row_order():
    model, data = tiny_vit(hidden_size=16), digits_dataset(10)
    inputs, labels = head_inputs(model, "classifier", data, batch_size=3)
    with torch.no_grad():
        pixels = torch.stack([data[i]["pixel_values"] for i in range(10)])
        hidden = model.vit(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(model.classifier(inputs), model.classifier(hidden))
    assert labels.tolist() == [int(data[i]["labels"]) for i in range(10)]


def test_evaluation_batches_keep_the_batches_and_a_user_collator_sees_only_model_columns():
    model, data = tiny_vit(hidden_size=16), digits_dataset(7).add_column("note", ["x"] * 7)
    seen = []

    def collate(rows):
        seen.append(set(rows[0]))
        return eval_collator(model)(rows)

    batches = evaluation_batches(model, data, collate, batch_size=4)
    assert [len(labels) for _, labels in batches] == [4, 3] and seen[0] == {"pixel_values", "labels"}
    plain = evaluation_batches(model, data, batch_size=4)
    torch.testing.assert_close(plain[1][0]["pixel_values"], batches[1][0]["pixel_values"])


def test_a_set_without_labels_or_rows_is_refused():
    data = digits_dataset(4).remove_columns("labels")
    with pytest.raises(AccInfError, match="needs a label column"):
        list(labelled_batches(data, eval_collator(tiny_vit(hidden_size=16))))
    with pytest.raises(AccInfError, match="is empty"):
        list(labelled_batches(digits_dataset(4).select([]), eval_collator(tiny_vit(hidden_size=16))))


def test_labels_outside_the_classes_are_refused_and_ignored_ones_counted():
    with pytest.raises(AccInfError, match="outside the model's 3 classes"):
        check_eval_labels(torch.tensor([0, 3]), 3)
    with pytest.raises(AccInfError, match="every score zero"):
        check_eval_labels(torch.tensor([-100, -100]), 3)
    assert check_eval_labels(torch.tensor([0, -100, 2]), 3) == 2
