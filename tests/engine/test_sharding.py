"""Many processes (docs/ENGINE.md "Many processes"): the row and step splits, the collectives at world size 1, and
one launch of two real processes (gloo) in which every form and method equals the single-process result (head
backends, the whole ViT and BERT, a BERT's last block)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hf_accinf.engine import ShardContext
from hf_accinf.engine.sharding import PeerFailure, process_timeout
from hf_accinf.errors import AccInfError
from hf_accinf.examples import digits_dataset, tiny_vit
from hf_accinf.scoring import load_scores
from hf_accinf.scoring.artifacts import load_embeddings
from tests.conftest import record_run
from tests.engine.test_deep_scope import tiny_model
from tests.launch import ROOT, launch_two_processes
from tests.scripts.many_processes import PARTITIONED, SCORE_CASES, TRAIN_ROWS, engine_cases, score_cases


def test_shard_ranges_cover_every_sample_once():
    for world in (1, 2, 3, 7):
        ranges = [ShardContext(rank, world).sample_range(23) for rank in range(world)]
        covered = [i for lo, hi in ranges for i in range(lo, hi)]
        assert covered == list(range(23))


def test_the_row_split_gives_every_row_to_one_process_and_keeps_a_sample_together():
    samples = torch.tensor([7, 3, 9, 3, 1, 12, 7, 5])  # 3 and 7 repeated (distributed padding)
    for world in (1, 2, 3, 5, 9):
        masks = torch.stack([ShardContext(rank, world).rows_of_step(samples) for rank in range(world)])
        assert torch.equal(masks.sum(0), torch.ones(len(samples), dtype=torch.long))
        for sample in samples.unique():
            owners = masks[:, samples == sample].any(1)
            assert int(owners.sum()) == 1
        sizes = [int(samples[mask].unique().numel()) for mask in masks]
        assert max(sizes) - min(sizes) <= 1  # balanced by distinct samples


def _restricted_parts_sum_to_the_batch(batch, dim: int) -> None:
    """The row split's invariant: the parts' batch gradients and ``H_B X`` sum to the whole batch's, and each part's
    per-row loss tangents and gradients (also kept, as exact removal keeps them) of its rows are the batch's own."""
    size = len(batch.row_weight)
    mine = ShardContext(0, 2).rows_of_step(torch.arange(size) % 3)  # repeated samples: rows 0, 3, ... together
    parts = [batch.restrict(mask.nonzero().flatten()) for mask in (mine, ~mine)]
    vectors = torch.randn(3, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    direction = vectors[0]
    scale = batch.batch_grad.abs().max()
    torch.testing.assert_close(sum(part.batch_grad for part in parts), batch.batch_grad, rtol=1e-12, atol=1e-14 * scale)
    torch.testing.assert_close(sum(part.hvp(vectors) for part in parts), batch.hvp(vectors), rtol=1e-10, atol=1e-12)
    tangents = batch.row_loss_tangents(direction)
    for part, mask in zip(parts, (mine, ~mine)):
        rows = mask.nonzero().flatten()
        torch.testing.assert_close(part.row_loss_tangents(direction)[rows], tangents[rows], rtol=1e-10, atol=1e-12)
        part.keep_row_grads()
        torch.testing.assert_close(part.row_grads(rows), batch.row_grads(rows), rtol=1e-10, atol=1e-14)


def test_a_batch_restricted_to_rows_is_its_share_of_every_batch_quantity():
    from tests.curvature.test_model_rows import CASES, curvature
    from tests.engine.helpers import make_problem

    torch.manual_seed(0)
    head = make_problem(model=torch.nn.Linear(6, 3).double(), num_samples=14, batch_size=6, features=6, classes=3)
    functional = make_problem(num_samples=14, batch_size=6)
    for problem in (head, functional):
        _restricted_parts_sum_to_the_batch(problem.curvature.at_step(1), problem.curvature.dim)
    model, step = CASES["vit"]()
    backend = curvature(model, step, ["all"])
    _restricted_parts_sum_to_the_batch(backend.at_step(0), backend.dim)


def test_step_split_and_collectives_at_world_size_one():
    assert [list(ShardContext(rank, 3).steps_of(7)) for rank in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    single = ShardContext.single()
    value = torch.arange(4.0)
    assert single.all_reduce_sum(value) is value and single.all_gather_object(3) == [3]
    single.barrier()
    with pytest.raises(RuntimeError):
        with single.guard():  # nothing to tell at world size 1: the error passes through
            raise RuntimeError("boom")


def test_process_timeout_from_the_environment(monkeypatch):
    monkeypatch.setenv("HF_ACCINF_PROCESS_TIMEOUT_S", "90")
    assert process_timeout().total_seconds() == 90
    assert process_timeout(5).total_seconds() == 5  # an explicit value wins
    monkeypatch.setenv("HF_ACCINF_PROCESS_TIMEOUT_S", "-1")
    with pytest.raises(AccInfError, match="positive number of seconds"):
        process_timeout()
    assert issubclass(PeerFailure, AccInfError)


def _close(launched: torch.Tensor, single: torch.Tensor, float32: bool = False) -> None:
    """float64: to 1e-10 of the largest score; float32: to a tolerance scaled by the score vector's norm (an
    all-reduce sums in another order)."""
    assert launched.shape == single.shape and single.abs().max() > 0
    if float32:
        assert (launched - single).norm() <= 1e-4 * single.norm()
    else:
        assert (launched - single).abs().max() <= 1e-10 * single.abs().max()


@pytest.mark.slow
def test_two_processes_give_the_single_process_result_for_every_form_and_method(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        record_run(tiny_vit(hidden_size=8), digits_dataset(TRAIN_ROWS), tmp_path / "run", learning_rate=1e-2,
                   warmup_steps=0.2, max_grad_norm=0.3, per_device_train_batch_size=8, num_train_epochs=1)
        model, text = tiny_model("bert")  # SGD with momentum, decay and clipping, 2 epochs of batches of 3
        record_run(model, text, tmp_path / "text" / "run", recording={"checkpoint_every": 1}, optim="sgd",
                   optim_args="momentum=0.9", learning_rate=0.5, weight_decay=0.01, max_grad_norm=0.5,
                   per_device_train_batch_size=3, num_train_epochs=2)
        text.save_to_disk(str(tmp_path / "text" / "data"))
        launch_two_processes(ROOT / "tests/scripts/many_processes.py", tmp_path)
        launched = load_file(tmp_path / "launched.safetensors")
        assert int(launched.pop("world_size")) == 2
        # one process failing: the other stops at its next collective with an error naming it (no hang), and
        # both leave the group (the launch returned)
        assert (tmp_path / "failure-1.txt").read_text() == "RuntimeError: a failure on process 1"
        assert (tmp_path / "failure-0.txt").read_text().startswith("PeerFailure: Process 1 of 2 failed")
        single = engine_cases(ShardContext.single(), str(tmp_path / "run"), str(tmp_path / "text"))
        assert set(launched) == set(single)
        for key, value in single.items():
            if key.startswith("growth/"):
                # Random probes cross coordinates where Adam's gain is up to lr / eps (whole model: gauge tensors,
                # DESIGN.md 6b), which amplifies the all-reduce's summation order: the growth is an estimate there.
                torch.testing.assert_close(launched[key], value, rtol=1e-3 if "/model/" in key else 1e-6, atol=0)
            else:
                _close(launched[key], value)
        score_cases(str(tmp_path / "run"), tmp_path / "single", ShardContext.single())
        _close(load_scores(tmp_path / "single" / PARTITIONED), load_scores(tmp_path / "single" / "adam-ie-forward"))
        for name in [*SCORE_CASES, PARTITIONED]:
            ours, theirs = tmp_path / "launched" / name, tmp_path / "single" / name
            _close(load_scores(ours), load_scores(theirs), float32="float32" in name)
            summary, reference = (json.loads((path / "scores.json").read_text()) for path in (ours, theirs))
            assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())  # no shards left
            if summary["files"] and "embeddings.safetensors" in summary["files"]:
                for key, value in load_embeddings(theirs).items():
                    _close(load_embeddings(ours)[key], value)
            if reference["verify"]:
                assert summary["verify"]["rows"] == reference["verify"]["rows"]
                for key in ("truth", "truth_half", "estimate"):
                    _close(torch.tensor(summary["verify"][key]), torch.tensor(reference["verify"][key]))
            if reference.get("lds"):  # LDS by replay: the subsets' counterfactuals split over the processes
                for ours_fraction, theirs_fraction in zip(summary["lds"]["fractions"], reference["lds"]["fractions"]):
                    for key in ("predicted", "measured", "measured_half", "predicted_per_query"):
                        _close(torch.tensor(ours_fraction[key]), torch.tensor(theirs_fraction[key]))
            if (reference["trust"] or {}).get("reference"):  # DVEmb against the exact adjoint, on the gathered scores
                assert summary["trust"]["reference"]["rows"] == TRAIN_ROWS
                assert summary["trust"]["reference"]["pearson_r"] == pytest.approx(
                    reference["trust"]["reference"]["pearson_r"], rel=1e-6)
            if (reference["trust"] or {}).get("growth"):  # the power iteration, its products split by rows (the head)
                assert summary["trust"]["growth"] == pytest.approx(reference["trust"]["growth"], rel=1e-6)
                assert summary["trust"]["embedding_ratio"] == pytest.approx(reference["trust"]["embedding_ratio"])
    finally:
        torch.set_num_threads(threads)
