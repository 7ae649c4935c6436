"""``hf-accinf score`` on a text classifier trained the ordinary transformers way: a tokenizer, ``datasets.map``,
a ``label`` column, raw text left in the dataset, dynamic padding; and the evaluation labels it refuses."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset, load_from_disk
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast, TrainingArguments

from hf_accinf import AccInfError, AccInfTrainer, RecordingArguments, ScoreArguments
from hf_accinf.cli import main
from hf_accinf.data.columns import read_provenance
from hf_accinf.scoring import load_scores, score_run

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "film", "plot", "was", "very", "not"]


def sentences(count: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(count):
        words = rng.choice(WORDS, size=rng.integers(3, 9)).tolist()
        texts.append(" ".join(words))
        labels.append(int(sum(w in ("good", "great", "fine") for w in words) >= sum(w in ("bad", "awful", "poor") for w in words)))
    return Dataset.from_dict({"text": texts, "label": labels})


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    tokenizer.save_pretrained(str(root / "tokenizer"))
    train = sentences(40, seed=0).map(lambda batch: tokenizer(batch["text"]), batched=True)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2))
    args = TrainingArguments(output_dir=str(root / "out"), per_device_train_batch_size=8, num_train_epochs=2, optim="sgd",
                             learning_rate=0.1, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0)
    AccInfTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                  recording=RecordingArguments(run_dir=str(root / "run"))).train()
    train.save_to_disk(str(root / "train"))  # reloaded: the fingerprint is gone from the schema metadata
    sentences(24, seed=1).save_to_disk(str(root / "eval"))  # raw text and 'label', not tokenized
    return root, tokenizer


def test_cli_scores_a_tokenized_training_set_with_a_raw_text_evaluation_set(text_run, capsys):
    root, tokenizer = text_run
    assert main(["score", "--run_dir", str(root / "run"), "--train_data", str(root / "train"), "--eval_data",
                 str(root / "eval"), "--tokenizer", str(root / "tokenizer"), "--text_columns", "text",
                 "--modules", "head", "--output_dir", str(root / "scores")]) == 0
    assert "schedule" in capsys.readouterr().err  # INFO logs are shown by default
    dynamic = load_scores(root / "scores")
    scored = load_from_disk(str(root / "scores" / "dataset"))  # the command writes the column, score_run does not
    torch.testing.assert_close(torch.tensor(scored["influence_acc_sgd_ie"], dtype=torch.float64), dynamic)
    provenance = read_provenance(scored)["columns"]["influence_acc_sgd_ie"]
    assert provenance["evaluation"]["source"] == f"--eval_data {root / 'eval'}" and provenance["evaluation"]["rows"] == 24
    # Another method into the same output is refused before any work, naming the difference; --overwrite replaces it.
    assert main(["score", "--run_dir", str(root / "run"), "--train_data", str(root / "train"), "--eval_data",
                 str(root / "eval"), "--tokenizer", str(root / "tokenizer"), "--text_columns", "text",
                 "--method", "sgd-ie", "--output_dir", str(root / "scores")]) == 2
    assert "method 'acc-sgd-ie' there, 'sgd-ie' now" in capsys.readouterr().err
    torch.testing.assert_close(load_scores(root / "scores"), dynamic)

    # Padding is inert: the same evaluation rows padded to a fixed length, collated without a tokenizer.
    fixed = sentences(24, seed=1).map(lambda b: tokenizer(b["text"], padding="max_length", max_length=16), batched=True)
    result = score_run(ScoreArguments(run_dir=str(root / "run"), output_dir=str(root / "fixed"), modules=["head"]),
                       load_from_disk(str(root / "train")), fixed.with_format("torch"), progress=False)
    torch.testing.assert_close(result.scores, dynamic, rtol=1e-5, atol=1e-9)
    assert dynamic.abs().max() > 0


def test_cli_scores_the_whole_model_on_unpadded_tokenized_rows(text_run):
    """Deep scopes replay each recorded step on the training rows: ``datasets.map`` output is not padded, so the
    rows are collated as the Trainer did (padded per micro-batch). Forward and adjoint forms agree there."""
    root, _ = text_run
    common = ["score", "--run_dir", str(root / "run"), "--train_data", str(root / "train"), "--eval_data",
              str(root / "eval"), "--tokenizer", str(root / "tokenizer"), "--text_columns", "text",
              "--method", "sgd-ie", "--modules", "all", "--dtype", "float64", "--trust_probes", "0"]
    assert main([*common, "--form", "adjoint", "--verify", "2", "--output_dir", str(root / "all_adjoint")]) == 0
    assert main([*common, "--form", "forward", "--output_dir", str(root / "all_forward")]) == 0
    adjoint, forward = load_scores(root / "all_adjoint"), load_scores(root / "all_forward")
    torch.testing.assert_close(adjoint, forward, rtol=1e-8, atol=1e-12 * float(forward.abs().max()))
    assert forward.abs().max() > 0


def _refused_before_the_sweep(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the estimation started before the input was checked")
    monkeypatch.setattr("hf_accinf.scoring.forms.estimate_influence", fail)


def _eval_set(tokenizer, labels):
    rows = sentences(len(labels), seed=2).remove_columns("label").add_column("labels", labels)
    return rows.map(lambda b: tokenizer(b["text"]), batched=True).with_format("torch")


def test_evaluation_labels_outside_the_classes_are_refused_first(text_run, monkeypatch, tmp_path):
    root, tokenizer = text_run
    _refused_before_the_sweep(monkeypatch)
    args = ScoreArguments(run_dir=str(root / "run"), output_dir=str(tmp_path / "s"))
    with pytest.raises(AccInfError, match=r"labels \[2\] outside the model's 2 classes"):
        score_run(args, load_from_disk(str(root / "train")), _eval_set(tokenizer, [0, 1, 2, 1]), tokenizer=tokenizer)
    with pytest.raises(AccInfError, match="All 3 evaluation rows have a negative label"):
        score_run(args, load_from_disk(str(root / "train")), _eval_set(tokenizer, [-1, -100, -1]), tokenizer=tokenizer)
    assert not (tmp_path / "s").exists()


def test_ignored_evaluation_labels_are_counted_and_warned(text_run, tmp_path, caplog):
    root, tokenizer = text_run
    args = ScoreArguments(run_dir=str(root / "run"), output_dir=str(tmp_path / "s"))
    with caplog.at_level("WARNING", logger="hf_accinf"):
        partial = score_run(args, load_from_disk(str(root / "train")), _eval_set(tokenizer, [0, -1, 1, -100]),
                            tokenizer=tokenizer, progress=False)
    assert "2 of 4 evaluation rows have a negative label" in caplog.text
    kept = _eval_set(tokenizer, [0, -1, 1, -100]).select([0, 2])
    args.output_dir, args.overwrite = str(tmp_path / "t"), True
    only_labelled = score_run(args, load_from_disk(str(root / "train")), kept, tokenizer=tokenizer, progress=False)
    torch.testing.assert_close(partial.scores, only_labelled.scores)
    assert json.loads((tmp_path / "s" / "scores.json").read_text())["evaluation"]["rows"] == 4
    assert not (tmp_path / "s" / "dataset").exists()  # score_run writes the score files only
