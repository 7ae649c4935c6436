"""The batched retraining equals the sequential replay (``Replay.train``) row by row, chunked or not.

Oracle: :meth:`hf_accinf.trajectory.replay.Replay.train`, an independent implementation (a real model and a
torch optimizer, one run at a time) of the same counterfactual, with the same recorded dropout masks.
Tolerance: the two differ by float32 round-off only (the functional optimizer step orders Adam's arithmetic
differently from torch's, and the vmapped forward computes attention in batches), carried along the run;
measured on these runs: <= 1e-6 of the distance the run moved the parameters. 1e-5 leaves a margin of 10,
while a row removed (the effect being measured) moves them by 1e-2 to 1e-1 of that distance, and a wrong
dropout mask by more.
"""

import pytest
import torch

from hf_accinf import AccInfError, RunReader
from hf_accinf.examples import digits_dataset, synthetic_text_dataset, tiny_bert, tiny_vit
from hf_accinf.inputs.evaluation import evaluation_batches
from hf_accinf.scoring.retraining import BatchedRetraining, retrain_many
from hf_accinf.trajectory.replay import REPLAY_TOLERANCE, Replay
from tests.conftest import record_run

ROUND_OFF = 1e-5


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    """Dropout on (BERT's default 0.1), AdamW with weight decay (HF's decay / no-decay groups), warm-up and
    linear decay, clipping that binds, accumulation 2."""
    run_dir = tmp_path_factory.mktemp("bert") / "run"
    data = synthetic_text_dataset(num_rows=32)
    model = tiny_bert()
    assert model.config.hidden_dropout_prob > 0 and model.config.attention_probs_dropout_prob > 0
    record_run(model, data, run_dir, recording={"checkpoint_every": 4}, gradient_accumulation_steps=2,
               per_device_train_batch_size=4, max_grad_norm=0.5, learning_rate=3e-3, warmup_steps=2,
               lr_scheduler_type="linear", weight_decay=0.01)
    run = RunReader(run_dir)
    assert len(run.manifest.param_groups) == 2 and (run.trajectory().clip_coef < 1).any()
    return run, data


@pytest.fixture(scope="module")
def bert_hidden_dropout_run(tmp_path_factory):
    """Dropout 0.1 outside attention only: the retraining runs eager attention (SDPA has no vmap rule), the
    masks of every other dropout still drawn as recorded."""
    run_dir = tmp_path_factory.mktemp("bert_hidden") / "run"
    data = synthetic_text_dataset(num_rows=32)
    model = tiny_bert()
    model.config.attention_probs_dropout_prob = 0.0
    for module in model.modules():
        if type(module).__name__.endswith("SelfAttention"):
            module.dropout.p = 0.0
    record_run(model, data, run_dir, recording={"checkpoint_every": 4}, per_device_train_batch_size=8,
               max_grad_norm=0.5, learning_rate=3e-3, weight_decay=0.01)
    run = RunReader(run_dir)
    assert run.build_model().config._attn_implementation == "sdpa"
    assert BatchedRetraining(run, data).model.config._attn_implementation == "eager"
    return run, data


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """torch SGD with momentum 0.9 and weight decay, clipping, 12 steps checkpointed every 8."""
    run_dir = tmp_path_factory.mktemp("vit") / "run"
    data = digits_dataset(num_rows=32)
    record_run(tiny_vit(), data, run_dir, recording={"checkpoint_every": 8}, optim="sgd", optim_args="momentum=0.9",
               learning_rate=0.05, max_grad_norm=1.0, weight_decay=0.01, num_train_epochs=3)
    return RunReader(run_dir), data


def _scales(length: int) -> tuple[torch.Tensor, list[dict[int, float] | None]]:
    """The base run, one row at 0, the same row at 0.5, and two rows at once (0 and 2)."""
    rows = [None, {5: 0.0}, {5: 0.5}, {3: 0.0, 11: 2.0}]
    scales = torch.ones(len(rows), length, dtype=torch.float64)
    for index, row in enumerate(rows):
        for j, factor in (row or {}).items():
            scales[index, j] = factor
    return scales, rows


def _distance(a, b, names):
    return sum((a[n].double() - b[n].double()).square().sum() for n in names).sqrt().item()


@pytest.mark.parametrize("case", ["bert_run", "bert_hidden_dropout_run", "vit_run"])
def test_batched_retraining_equals_the_sequential_replay_row_by_row(case, request):
    run, data = request.getfixturevalue(case)
    scales, rows = _scales(len(data))
    result = retrain_many(run, data, None, scales, progress=False)
    replay = Replay(run, data)
    names = list(result.values)
    final, start = run.load_checkpoint(run.num_steps), run.load_checkpoint(0)
    moved = _distance(final, start, names)
    assert result.replay_error < REPLAY_TOLERANCE and result.loss_error < 1e-5  # the base row is the recorded run
    assert _distance({n: v[0] for n, v in result.values.items()}, final, names) < REPLAY_TOLERANCE * moved
    for index, row in enumerate(rows):
        sequential = replay.train(row)
        batched = {n: v[index] for n, v in result.values.items()}
        effect = _distance(sequential, final, names)
        assert (effect > 1e-3 * moved) == (row is not None)  # each counterfactual changes the training
        assert _distance(batched, sequential, names) < ROUND_OFF * moved


def test_chunks_give_the_rows_of_one_batch_and_carry_their_own_base(bert_run):
    run, data = bert_run
    scales, _ = _scales(len(data))
    retraining = BatchedRetraining(run, data)
    batches = evaluation_batches(retraining.model, data)

    def evaluate(parameters):
        return retraining.losses(parameters, batches).mean(1)

    whole = retraining.retrain(scales[1:], evaluate, with_base=True, progress=False)
    chunked = retraining.retrain(scales[1:], evaluate, with_base=True, models_per_chunk=2, progress=False)
    assert whole.models_per_chunk >= 4 and chunked.models_per_chunk == 2
    assert chunked.chunk_of.tolist() == [0, 1, 2] and len(chunked.base) == 3 and whole.chunk_of.tolist() == [0, 0, 0]
    # Every chunk's base run is the recorded run; each row's effect is taken against its own chunk's base.
    assert torch.allclose(chunked.base, whole.base.expand(3), rtol=1e-6, atol=0)
    assert torch.allclose(chunked.effect(), whole.effect(), rtol=1e-4, atol=1e-8)
    assert (chunked.effect().abs() > 1e-5).all()


def test_evaluation_losses_equal_the_model_in_eval_mode(bert_run):
    run, data = bert_run
    retraining = BatchedRetraining(run, data)
    final = run.load_checkpoint(run.num_steps)
    stacked = {n: torch.stack([final[n], retraining.initial[n]]) for n in retraining.names}
    losses = retraining.losses(stacked, evaluation_batches(retraining.model, data, batch_size=7))
    model = run.build_model().eval()
    with torch.no_grad():
        logits = model(input_ids=data[:]["input_ids"], attention_mask=data[:]["attention_mask"]).logits.double()
    expected = torch.nn.functional.cross_entropy(logits, data[:]["labels"], reduction="none")
    assert losses.shape == (2, len(data)) and torch.allclose(losses[0], expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(losses[1], expected, rtol=1e-2)  # the second model is the initial one


def test_bad_scales_and_a_budget_that_holds_no_model_are_refused_before_any_work(bert_run):
    run, data = bert_run
    retraining = BatchedRetraining(run, data, memory_budget=1000)
    with pytest.raises(AccInfError, match="memory_budget_gb"):
        retraining.retrain(torch.ones(1, len(data)), progress=False)
    with pytest.raises(AccInfError, match=r"\(M, 32\)"):
        retraining.retrain(torch.ones(2, len(data) + 1), progress=False)
    with pytest.raises(AccInfError, match="finite"):
        retraining.retrain(torch.full((1, len(data)), float("nan")), progress=False)
