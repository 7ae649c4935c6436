"""Leave-one-out retraining by replay, checked against the recorded run and an independent naive loop."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, get_linear_schedule_with_warmup

from hf_accinf import RunReader
from hf_accinf.config import ScoreArguments
from hf_accinf.evaluation.verify import counterfactual_losses, retrain, verify
from hf_accinf.examples import digits_dataset, synthetic_text_dataset, tiny_bert, tiny_vit
from hf_accinf.scoring import score_run
from hf_accinf.trajectory.replay import Replay
from tests.conftest import record_run

ROWS = 32
BATCH, ACCUMULATION, MAX_NORM, LR, WARMUP = 4, 2, 0.5, 3e-3, 2


def _bert_without_dropout():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def _record(tmp_path_factory, model, name):
    run_dir = tmp_path_factory.mktemp(name) / "run"
    data = synthetic_text_dataset(num_rows=ROWS)
    record_run(model, data, run_dir, recording={"checkpoint_every": 4}, per_device_train_batch_size=BATCH,
               gradient_accumulation_steps=ACCUMULATION, max_grad_norm=MAX_NORM, learning_rate=LR, warmup_steps=WARMUP,
               lr_scheduler_type="linear", weight_decay=0.0)
    return RunReader(run_dir), data


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory):
    return _record(tmp_path_factory, tiny_bert(), "dropout")


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    return _record(tmp_path_factory, _bert_without_dropout(), "plain")


def _distance(a, b):
    return sum((a[n].double() - b[n].double()).square().sum() for n in b if b[n].is_floating_point()).sqrt().item()


def test_retraining_with_unit_weights_is_the_recorded_run(dropout_run):
    run, data = dropout_run
    final = run.load_checkpoint(run.num_steps)
    replayed = retrain(run, data, weight_scale={j: 1.0 for j in range(ROWS)})
    moved = _distance(final, run.load_checkpoint(0))
    assert _distance(replayed, final) < 1e-5 * moved  # float32 round-off, see tests/trajectory/test_replay.py


def _naive_leave_one_out(run, data, left_out):
    """Plain torch: AdamW + HF's linear warm-up schedule + global clipping over the recorded batches, row
    ``left_out`` dropped from its micro-batches, each micro-batch loss its mean over all its rows. The Trainer
    does not divide BERT's mean loss by the accumulation steps (docs/RECORDING.md): the micro-batch means add up."""
    model = run.build_model(step=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, WARMUP, run.num_steps)
    trajectory = run.trajectory()
    for step in range(run.num_steps):
        rows = trajectory.batch(step)
        assert len(rows) == BATCH * ACCUMULATION  # 32 rows: no uneven micro-batch
        optimizer.zero_grad()
        for micro in rows.split(BATCH):
            keep = [int(r) for r in micro if int(r) != left_out]
            batch = data[keep]
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum") / BATCH
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        scheduler.step()
    return model.state_dict()


def test_retraining_a_row_out_equals_a_naive_training_loop_without_it(plain_run):
    run, data = plain_run
    left_out = 5
    replay = Replay(run, data)
    removed = retrain(run, data, weight_scale={left_out: 0.0}, replay=replay)
    naive = _naive_leave_one_out(run, data, left_out)
    final = run.load_checkpoint(run.num_steps)
    effect = _distance(removed, final)
    assert effect > 1e-4 * _distance(final, run.load_checkpoint(0))  # removing the row changes the training
    assert _distance(removed, naive) < 1e-3 * effect
    assert _distance(replay.train({left_out: 0.5}), final) < 0.75 * effect  # half the weight, part of the way


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sgd") / "run"
    data = digits_dataset(num_rows=40)
    record_run(tiny_vit(), data, run_dir, optim="sgd", optim_args="momentum=0.9", learning_rate=0.05, max_grad_norm=1.0)
    return RunReader(run_dir), data


def test_verify_reports_agreement_with_exact_counterfactuals(sgd_run):
    run, data = sgd_run
    eval_data = digits_dataset(num_rows=40, offset=40)
    scores = score_run(ScoreArguments(run_dir=str(run.run_dir), method="sgd-ie"), data, eval_data, progress=False).scores
    result = verify(run, data, None, eval_data, scores, k=3, seed=0)
    rows = result["rows"]
    assert len(set(rows)) == 3 and all(0 <= r < len(data) for r in rows)
    assert result["estimate"] == scores[rows].tolist()
    for key in ("kendall_tau", "pearson_r"):
        assert -1 <= result[key] <= 1 and -1 <= result["linearity_ceiling"][key] <= 1
    assert 0 <= result["sign_agreement"] <= 1 and result["replay_error"] < 1e-4
    # The truth is the eval loss at an exact retraining, against the replayed run's own eval loss.
    removed = counterfactual_losses(run, [retrain(run, data, weight_scale={rows[0]: 0.0})], eval_data)[0]
    assert result["truth"][0] == (removed - result["base_eval_loss"]).item() != 0
    model = run.build_model()
    with torch.no_grad():
        logits = model(pixel_values=eval_data[:]["pixel_values"]).logits
    recorded = torch.nn.functional.cross_entropy(logits.double(), eval_data[:]["labels"]).item()
    assert abs(result["base_eval_loss"] - recorded) < 1e-5
