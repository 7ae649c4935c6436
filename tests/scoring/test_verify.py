"""``--verify``'s truth: the batched retraining against an independent naive training loop, and the agreement.

Oracle: plain torch (the HF Trainer's decay / no-decay parameter groups, the torch optimizer, HF's linear
schedule, ``clip_grad_norm_``) over the recorded batches, the recorded CPU random state restored before each
micro-batch (the same dropout masks), each micro-batch loss ``sum_r f_r l_r / b`` with the counterfactual's
row factors ``f`` (0 removes a row, 0.5 halves its weight; the Trainer does not divide BERT's mean loss by
the accumulation steps, docs/RECORDING.md). Tolerance: the two implementations differ by float32
round-off carried along the run (~1e-6 of the distance the run moved the parameters); a counterfactual
moves the final parameters by 1e-2 to 1e-1 of it, and the bound is 1e-3 of that effect.
"""

import numpy as np
import pytest
import torch
from transformers import Trainer, get_linear_schedule_with_warmup

from hf_accinf import RunReader
from hf_accinf.config import ScoreArguments
from hf_accinf.examples import digits_dataset, synthetic_text_dataset, tiny_bert, tiny_vit
from hf_accinf.scoring import score_run
from hf_accinf.scoring.retraining import retrain_many
from hf_accinf.scoring.verify import bootstrap_interval, describe, verify
from hf_accinf.trajectory.replay import REPLAY_TOLERANCE
from tests.conftest import record_run

BERT = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=0.5, learning_rate=3e-3,
            warmup_steps=2, lr_scheduler_type="linear", weight_decay=0.01)
VIT = dict(per_device_train_batch_size=8, optim="sgd", optim_args="momentum=0.9", learning_rate=0.05,
           max_grad_norm=1.0, weight_decay=0.01)


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    """AdamW with weight decay, dropout on (0.1), clipping, warm-up, accumulation 2."""
    run_dir = tmp_path_factory.mktemp("bert") / "run"
    data = synthetic_text_dataset(num_rows=32)
    model = tiny_bert()
    assert model.config.hidden_dropout_prob > 0
    record_run(model, data, run_dir, recording={"checkpoint_every": 4}, **BERT)
    return RunReader(run_dir), data, BERT


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """SGD with momentum 0.9 and weight decay, clipping."""
    run_dir = tmp_path_factory.mktemp("vit") / "run"
    data = digits_dataset(num_rows=40)
    record_run(tiny_vit(), data, run_dir, **VIT)
    return RunReader(run_dir), data, VIT


def _naive_training(run, data, recipe, factors: dict[int, float]) -> dict[str, torch.Tensor]:
    """The recorded recipe retrained by plain torch with row ``j``'s loss multiplied by ``factors[j]``."""
    model = run.build_model(step=0).train()
    decayed = set(Trainer.get_decay_parameter_names(None, model))
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n in decayed], "weight_decay": recipe["weight_decay"]},
              {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0}]
    if recipe.get("optim") == "sgd":
        optimizer = torch.optim.SGD(groups, lr=recipe["learning_rate"], momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(groups, lr=recipe["learning_rate"])
    scheduler = get_linear_schedule_with_warmup(optimizer, recipe.get("warmup_steps", 0), run.num_steps)
    trajectory = run.trajectory()
    size = recipe["per_device_train_batch_size"]
    inputs = [name for name in data.column_names if name != "labels"]
    for step in range(run.num_steps):
        optimizer.zero_grad()
        micro = trajectory.micro_batches_of(step)
        for index, rows in zip(range(micro.start, micro.stop), trajectory.batch(step).split(size)):
            assert len(rows) == size  # no uneven micro-batch: every divisor is the micro-batch size
            torch.set_rng_state(trajectory.rng_cpu[index].clone())
            batch = data[rows.tolist()]
            logits = model(**{name: batch[name] for name in inputs}).logits
            factor = torch.tensor([factors.get(int(row), 1.0) for row in rows])
            losses = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
            ((factor * losses).sum() / size).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["max_grad_norm"])
        optimizer.step()
        scheduler.step()
    return {name: value.detach() for name, value in model.state_dict().items()}


def _distance(a, b, names):
    return sum((a[n].double() - b[n].double()).square().sum() for n in names).sqrt().item()


COUNTERFACTUALS = [{5: 0.0}, {5: 0.5}, {17: 0.0}, {17: 0.5}]


@pytest.mark.parametrize("case", ["bert_run", "vit_run"])
def test_retraining_rows_out_and_at_half_weight_equals_a_naive_training_loop(case, request):
    run, data, recipe = request.getfixturevalue(case)
    scales = torch.ones(len(COUNTERFACTUALS), len(data), dtype=torch.float64)
    for index, factors in enumerate(COUNTERFACTUALS):
        for row, factor in factors.items():
            scales[index, row] = factor
    result = retrain_many(run, data, None, scales, with_base=True, progress=False)
    names = list(result.values)
    final, start = run.load_checkpoint(run.num_steps), run.load_checkpoint(0)
    moved = _distance(final, start, names)
    naive_base = _naive_training(run, data, recipe, {})
    assert _distance(naive_base, final, names) < REPLAY_TOLERANCE * moved  # the oracle reproduces the recorded run
    for index, factors in enumerate(COUNTERFACTUALS):
        naive = _naive_training(run, data, recipe, factors)
        effect = _distance(naive, naive_base, names)
        assert effect > 1e-3 * moved  # the counterfactual changes the training
        assert _distance({n: v[index] for n, v in result.values.items()}, naive, names) < 1e-3 * effect


@pytest.fixture(scope="module")
def scored(vit_run):
    run, data, _ = vit_run
    eval_data = digits_dataset(num_rows=40, offset=40)
    args = ScoreArguments(run_dir=str(run.run_dir), method="sgd-ie")
    scores = score_run(args, data, eval_data, progress=False).scores
    return run, data, eval_data, scores


def _eval_loss(run, parameters, eval_data) -> float:
    model = run.build_model().eval()
    model.load_state_dict(parameters)
    with torch.no_grad():
        logits = model(pixel_values=eval_data[:]["pixel_values"]).logits
    return torch.nn.functional.cross_entropy(logits.double(), eval_data[:]["labels"]).item()


def test_verify_reports_agreement_with_exact_counterfactuals(scored):
    run, data, eval_data, scores = scored
    result = verify(run, data, None, eval_data, scores, k=3, seed=0, progress=False)
    rows = result["rows"]
    assert len(set(rows)) == 3 and all(0 <= r < len(data) for r in rows)
    assert result["estimate"] == scores[rows].tolist()
    for key in ("kendall_tau", "pearson_r"):
        assert -1 <= result[key] <= 1 and -1 <= result["linearity_ceiling"][key] <= 1
    assert 0 <= result["sign_agreement"] <= 1 and result["replay_error"] < REPLAY_TOLERANCE
    # The base is the recorded run; the truth is the eval loss of a naive retraining without the row.
    recorded = _eval_loss(run, run.load_checkpoint(run.num_steps), eval_data)
    assert abs(result["base_eval_loss"] - recorded) < 1e-5
    for index in (0, 2):
        for factor, key in ((0.0, "truth"), (0.5, "truth_half")):
            naive = _eval_loss(run, _naive_training(run, data, VIT, {rows[index]: factor}), eval_data) - recorded
            assert abs(result[key][index] - naive) < 1e-3 * abs(naive) + 1e-6 and abs(naive) > 1e-4


def test_verify_gives_bootstrap_intervals_of_kendall_tau(scored):
    run, data, eval_data, scores = scored
    result = verify(run, data, None, eval_data, scores, k=8, seed=1, progress=False)
    for check in (result, result["linearity_ceiling"]):
        low, high = check["kendall_tau_interval"]
        assert -1 <= low <= check["kendall_tau"] + 1e-12 and check["kendall_tau"] - 1e-12 <= high <= 1
        assert f"{check['kendall_tau']:.3f} [{low:.2f}, {high:.2f}]" in describe(result)


def test_bootstrap_interval_of_kendall_tau():
    a = np.arange(12.0)
    assert bootstrap_interval(a, 2 * a + 1, seed=0) == pytest.approx([1.0, 1.0], abs=1e-12)  # every resample: tau 1
    assert bootstrap_interval(a, -a, seed=0) == pytest.approx([-1.0, -1.0], abs=1e-12)
    noisy = a + np.random.default_rng(0).normal(scale=4.0, size=12)
    interval = bootstrap_interval(a, noisy, seed=3)
    assert interval == bootstrap_interval(a, noisy, seed=3) and interval[1] - interval[0] > 0.2
    wide = np.concatenate([a, a + 12])
    narrower = bootstrap_interval(wide, np.concatenate([noisy, noisy + 12]), seed=3)
    assert narrower[1] - narrower[0] < interval[1] - interval[0]  # more rows, a narrower interval
