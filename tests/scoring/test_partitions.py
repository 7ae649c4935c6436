"""Partitions (``num_partitions``, ``partition``): each job scores its rows (forward form) or its steps (TracIn),
and the aggregate equals the scores and embeddings of one unpartitioned run; the adjoint form is refused."""

import pytest
import torch

from hf_accinf import AccInfError
from hf_accinf.config import ScoreArguments
from hf_accinf.engine.sharding import ShardContext, partition_range
from hf_accinf.examples import digits_dataset, tiny_vit
from hf_accinf.scoring import score_run
from hf_accinf.scoring.artifacts import load_embeddings
from hf_accinf.scoring import aggregate_partitions
from tests.conftest import record_run

ROWS = 50  # three partitions of 17, 17 and 16 rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny ViT trained with SGD (momentum, clipping) and one with AdamW (warm-up, clipping), on the same digits."""
    out = tmp_path_factory.mktemp("partitions")
    train, held_out = digits_dataset(ROWS, seed=0), digits_dataset(40, seed=0, offset=ROWS)
    record_run(tiny_vit(seed=0, hidden_size=16), train, out / "sgd", optim="sgd", optim_args="momentum=0.9",
               learning_rate=0.05, max_grad_norm=1.0, per_device_train_batch_size=16)
    record_run(tiny_vit(seed=0, hidden_size=16), train, out / "adamw", learning_rate=5e-3, warmup_steps=2,
               max_grad_norm=1.0, per_device_train_batch_size=16)
    return {"sgd": out / "sgd", "adamw": out / "adamw"}, train, held_out


def _score(run_dir, output_dir, train, held_out, **arguments):
    arguments = {"trust_probes": 0, **arguments}
    args = ScoreArguments(run_dir=str(run_dir), output_dir=str(output_dir), modules=["head"], dtype="float64",
                          **arguments)
    return score_run(args, train, held_out, progress=False)


def test_a_partition_is_a_slice_of_the_rows_split_again_by_rank():
    assert [partition_range(50, i, 3) for i in range(3)] == [(0, 17), (17, 34), (34, 50)]
    assert [partition_range(2, i, 3) for i in range(3)] == [(0, 1), (1, 2), (2, 2)]  # more partitions than rows
    ranges = [ShardContext(rank, 2, partition=(index, 3)).sample_range(50) for index in range(3) for rank in range(2)]
    assert ranges == [(0, 9), (9, 17), (17, 26), (26, 34), (34, 42), (42, 50)]
    assert ShardContext(1, 2).sample_range(50) == (25, 50)  # one partition: the ranks split every row


@pytest.mark.parametrize("run, method", [("sgd", "sgd-ie"), ("sgd", "acc-sgd-ie"), ("adamw", "adam-ie"),
                                         ("adamw", "dvemb"), ("adamw", "tracin")])
def test_aggregated_partitions_equal_the_unpartitioned_run(runs, run, method, tmp_path):
    run_dirs, train, held_out = runs
    form = "auto" if method == "tracin" else "forward"
    whole = _score(run_dirs[run], tmp_path / "whole", train, held_out, method=method, form=form)
    for index in (2, 0, 1):  # any order, as independent jobs finish
        part = _score(run_dirs[run], tmp_path / "parts", train, held_out, method=method, form=form,
                      num_partitions=3, partition=index)
        expected = ROWS if method == "tracin" else len(range(*partition_range(ROWS, index, 3)))
        assert part.scores.shape == (expected,)
    assert not (tmp_path / "parts" / "scores.json").exists()  # shards only, until aggregated
    artifact = aggregate_partitions(tmp_path / "parts")
    scale = float(whole.scores.abs().max())
    assert scale > 0 and (artifact.scores - whole.scores).abs().max() <= 1e-10 * scale
    if method != "tracin":  # the rows' embeddings are the unpartitioned ones, in row order
        aggregated = load_embeddings(tmp_path / "parts")
        assert set(aggregated) == set(whole.embeddings)
        for name, value in whole.embeddings.items():
            assert (aggregated[name] - value).abs().max() <= 1e-10 * float(value.abs().max())
    summary = artifact.summary
    assert summary.method == method and summary.extra["partitions"]["count"] == 3
    assert summary.extra["partitions"]["combine"] == ("sum" if method == "tracin" else "rows")
    assert summary.most_harmful == torch.argsort(whole.scores)[:10].tolist()
    names = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert names == sorted(["scores.json", "scores.safetensors"] + (["embeddings.safetensors"] if method != "tracin" else []))


def test_the_adjoint_form_and_verify_are_refused_before_any_work(runs, tmp_path):
    run_dirs, train, held_out = runs
    with pytest.raises(AccInfError, match="adjoint form cannot be split.*--form forward"):
        _score(run_dirs["sgd"], tmp_path / "adjoint", train, held_out, method="sgd-ie", form="adjoint",
               num_partitions=2, partition=1)
    with pytest.raises(AccInfError, match="adjoint form cannot be split"):  # auto picks the adjoint here
        _score(run_dirs["sgd"], tmp_path / "adjoint", train, held_out, method="sgd-ie", num_partitions=2)
    with pytest.raises(AccInfError, match="--verify and --verify_subsets need every row"):
        _score(run_dirs["sgd"], tmp_path / "verify", train, held_out, method="sgd-ie", form="forward", verify=4,
               num_partitions=2)
    with pytest.raises(AccInfError, match="--verify and --verify_subsets need every row"):
        _score(run_dirs["sgd"], tmp_path / "verify", train, held_out, method="sgd-ie", form="forward",
               verify_subsets=3, verify_fraction=[0.1], num_partitions=2)
    assert not (tmp_path / "adjoint").exists() and not (tmp_path / "verify").exists()
    with pytest.raises(ValueError, match="partition must lie in"):
        ScoreArguments(num_partitions=2, partition=2)


def test_the_first_partition_measures_the_runs_growth(runs, tmp_path):
    """The trust figure is the run's (the power iteration), not the rows': partition 0 measures it, the others skip
    it, and the aggregate carries it; the embedding ratio, which needs every row, is left out."""
    run_dirs, train, held_out = runs
    options = dict(method="sgd-ie", form="forward", trust_probes=2)
    whole = _score(run_dirs["sgd"], tmp_path / "whole", train, held_out, **options)
    parts = [_score(run_dirs["sgd"], tmp_path / "parts", train, held_out, num_partitions=2, partition=index, **options)
             for index in (0, 1)]
    assert parts[1].trust is None and parts[0].trust["embedding_ratio"] is None
    assert parts[0].trust["growth"] == pytest.approx(whole.trust["growth"], rel=1e-12)
    assert aggregate_partitions(tmp_path / "parts").summary.trust == parts[0].trust
