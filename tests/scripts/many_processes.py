"""Run under `accelerate launch --multi_gpu --num_processes 2 ... WORK_DIR` (tests/engine/test_sharding.py): every
form and method split over the processes (docs/ENGINE.md "Many processes"). The main process saves what the engine
returns (``WORK_DIR/launched.safetensors``); :func:`score_cases` write their score sets under ``WORK_DIR/launched``.
The test computes the same in one process (the functions below with ``ShardContext.single()``) and compares.
``WORK_DIR`` holds the recorded runs: ``run`` (a ViT, AdamW, digits) and ``text/run`` with ``text/data`` (a BERT, SGD)."""

import sys
from pathlib import Path

import torch
from datasets import load_from_disk
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parents[2]))

from hf_accinf import ScoreArguments, score_run  # noqa: E402
from hf_accinf.engine import CorrectionPolicy, ShardContext, estimate_influence  # noqa: E402
from hf_accinf.engine.adjoint import adjoint_scores  # noqa: E402
from hf_accinf.engine.sharding import PeerFailure  # noqa: E402
from hf_accinf.examples import digits_dataset  # noqa: E402
from hf_accinf.methods.registry import build_method  # noqa: E402
from hf_accinf.problem import problem_from_run  # noqa: E402
from hf_accinf.scoring import aggregate_partitions  # noqa: E402
from hf_accinf.trajectory import RunReader  # noqa: E402
from tests.engine.helpers import make_problem  # noqa: E402
from tests.methods.helpers import make_adam_problem  # noqa: E402

TRAIN_ROWS, EVAL_ROWS = 24, 12
# score_run cases on the recorded AdamW run: name -> arguments (float64, no trust figure, unless they say otherwise)
SCORE_CASES = {
    "acc-adam-ie-forward-verify": dict(method="acc-adam-ie", form="forward", modules=["head"], verify=4, trust="power",
                                       trust_probes=2, verify_subsets=3, verify_fraction=[0.25], verify_queries=2),
    "adam-ie-adjoint-lds": dict(method="adam-ie", form="adjoint", modules=["head"], verify_subsets=3,
                                verify_fraction=[0.25], verify_queries=2),
    "adam-ie-forward": dict(method="adam-ie", form="forward", modules=["head"], removal="first-order"),
    "dvemb-forward-all": dict(method="dvemb", form="forward", modules=["all"], projection_dim=6),
    "tracin": dict(method="tracin", modules=["head"]),
    "adam-ie-adjoint-all-float32": dict(method="adam-ie", form="adjoint", modules=["all"], dtype="float32"),
}
PARTITIONED = "adam-ie-forward-in-2-partitions"  # the adam-ie-forward case as two partitions, aggregated


def head_problems() -> dict:
    """The SGD (momentum, clipping, a repeated row) and AdamW (warm-up and decay, clipping) problems of 23 rows."""
    return {"sgd": make_problem(num_samples=23, batch_size=5, epochs=3),
            "adam": make_adam_problem("AdamW", num_samples=23, batch_size=5, epochs=3)}


def objective(dim: int) -> torch.Tensor:
    return torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


def engine_cases(shard: ShardContext, run_dir: str, text_dir: str) -> dict[str, torch.Tensor]:
    """The engine's results: adjoint scores (and probe growth), forward embeddings of this process's rows, TracIn.
    ``run_dir``: a ViT trained with AdamW on digits; ``text_dir``: a BERT trained with SGD (``run``, ``data``)."""
    results = {}
    problems = head_problems()
    train = digits_dataset(TRAIN_ROWS)
    problems["model"] = problem_from_run(RunReader(run_dir), modules=["all"], train_dataset=train)
    text = load_from_disk(str(Path(text_dir) / "data"))
    problems["bert"] = problem_from_run(RunReader(Path(text_dir) / "run"), modules=["all"], train_dataset=text)
    problems["bert-last"] = problem_from_run(RunReader(Path(text_dir) / "run"), modules=["last:1"], train_dataset=text)
    for run, method in (("sgd", "sgd-ie"), ("adam", "adam-ie"), ("model", "adam-ie"), ("bert", "sgd-ie"),
                        ("adam", "dvemb")):
        problem = problems[run]
        for removal in ("exact", "first-order") if method != "dvemb" else ("exact",):
            rule = build_method(problem, method, removal=removal, projection_dim=5)
            rule.shard = shard
            gradient = rule.embed_gradient(objective(problem.curvature.dim))
            backward = adjoint_scores(rule, problem, gradient, shard=shard, progress=False, probes=2)
            if shard.is_main:
                results[f"adjoint/{run}/{method}/{removal}"] = backward.scores
                results[f"growth/{run}/{method}/{removal}"] = torch.tensor(backward.trust.growth, dtype=torch.float64)
    problem = problems["sgd"]  # stage-limited ACC: the hybrid (forward form on the corrected prefix, by samples)
    rule = build_method(problem, "acc-sgd-ie")
    hybrid = adjoint_scores(rule, problem, objective(problem.curvature.dim), shard=shard, progress=False,
                            policy=CorrectionPolicy("stage", stages=[(1, 5)]))
    if shard.is_main:
        results["hybrid/acc-sgd-ie"] = hybrid.scores
    for method in ("sgd-ie", "acc-sgd-ie", "acc-dvemb", "adam-ie", "acc-adam-ie"):
        problem = problems["adam" if "adam" in method else "sgd"]
        policy = CorrectionPolicy("random", p=0.5, seed=1) if method.startswith("acc-") else None
        for schedule in ("sweep", "propagator"):
            rule = build_method(problem, method, projection_dim=5)
            rule.shard = shard
            forward = estimate_influence(problem, rule, policy=policy, schedule=schedule, shard=shard,
                                         progress=False, gather=False)
            assert forward.rows == shard.sample_range(problem.num_samples), forward.rows
            results[f"forward/{method}/{schedule}"] = shard.gather_rows(forward.embeddings, problem.num_samples)
    for method in ("sgd-ie", "acc-sgd-ie"):  # a deep scope's forward form: each process its rows
        problem = problems["bert-last"]
        policy = CorrectionPolicy("all") if method.startswith("acc-") else None
        forward = estimate_influence(problem, build_method(problem, method), policy=policy, schedule="sweep",
                                     shard=shard, progress=False, gather=False)
        results[f"forward-last/{method}"] = shard.gather_rows(forward.embeddings, problem.num_samples)
    problem = problems["sgd"]
    results["tracin"] = build_method(problem, "tracin").scores(lambda step: objective(problem.curvature.dim),
                                                               shard=shard)
    return results


def score_cases(run_dir: str, out_dir: Path, shard: ShardContext) -> None:
    train, held_out = digits_dataset(TRAIN_ROWS), digits_dataset(EVAL_ROWS, offset=TRAIN_ROWS)
    for name, options in SCORE_CASES.items():
        options = {"dtype": "float64", "trust_probes": 0, **options}
        score_run(ScoreArguments(run_dir=run_dir, output_dir=str(out_dir / name), **options), train, held_out,
                  shard=shard, progress=False)
    # the forward form in two partitions (independent jobs), each split over the processes, then aggregated
    options = {"dtype": "float64", "trust_probes": 0, **SCORE_CASES["adam-ie-forward"]}
    for partition in range(2):
        score_run(ScoreArguments(run_dir=run_dir, output_dir=str(out_dir / PARTITIONED), num_partitions=2,
                                 partition=partition, **options), train, held_out, shard=shard, progress=False)
    if shard.is_main:
        aggregate_partitions(out_dir / PARTITIONED)


def failure_case(shard: ShardContext) -> str:
    """Process 1 fails inside guarded work while process 0 waits at a collective: what each of them raises."""
    try:
        with shard.guard():
            if shard.rank == 1:
                raise RuntimeError("a failure on process 1")
            shard.barrier()
    except PeerFailure as error:
        return f"PeerFailure: {error}"
    except RuntimeError as error:
        return f"RuntimeError: {error}"
    return "no error"


def main(work_dir: str) -> None:
    torch.set_num_threads(1)
    work = Path(work_dir)
    shard = ShardContext.from_accelerate(cpu=True)
    assert shard.world_size == 2, shard.world_size
    try:
        with shard.guard():
            results = engine_cases(shard, str(work / "run"), str(work / "text"))
            score_cases(str(work / "run"), work / "launched", shard)
        if shard.is_main:
            results["world_size"] = torch.tensor(shard.world_size)
            save_file({key: value.contiguous() for key, value in results.items()}, str(work / "launched.safetensors"))
        (work / f"failure-{shard.rank}.txt").write_text(failure_case(shard))
    finally:
        shard.close()


if __name__ == "__main__":
    main(sys.argv[1])
