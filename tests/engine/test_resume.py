"""Resume points (engine/resume.py): an adjoint interrupted after some steps, or a forward form interrupted after
some chunks of rows, resumes from its last resume point and gives the scores of an uninterrupted run; the
resume files are removed after success; a resume point of other arguments is not used."""

import pytest
import torch

from hf_accinf.config import ScoreArguments
from hf_accinf.engine import adjoint as adjoint_module
from hf_accinf.engine import estimator as estimator_module
from hf_accinf.engine.resume import RESUME_DIR, ResumeStore, adjoint_name
from hf_accinf.engine.sharding import ShardContext
from hf_accinf.examples import digits_dataset, tiny_vit
from hf_accinf.scoring import score_run
from hf_accinf.trajectory import RunReader
from tests.conftest import record_run

ROWS = 50


class Interrupted(RuntimeError):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    train, held_out = digits_dataset(ROWS, seed=0), digits_dataset(40, seed=0, offset=ROWS)
    record_run(tiny_vit(seed=0, hidden_size=16), train, out / "sgd", optim="sgd", optim_args="momentum=0.9",
               learning_rate=0.05, max_grad_norm=1.0, per_device_train_batch_size=16, recording={"checkpoint_every": 3})
    record_run(tiny_vit(seed=0, hidden_size=16), train, out / "adamw", learning_rate=5e-3, warmup_steps=2,
               max_grad_norm=1.0, per_device_train_batch_size=16)
    return {"sgd": out / "sgd", "adamw": out / "adamw"}, train, held_out


def _score(run_dir, output_dir, train, held_out, **arguments):
    args = ScoreArguments(run_dir=str(run_dir), output_dir=str(output_dir), dtype="float64", **arguments)
    return score_run(args, train, held_out, progress=False)


def _interrupt_after(monkeypatch, module, name, calls: int):
    """Let ``module.name`` run ``calls`` times, then raise (after the call: its resume point is saved)."""
    original, count = getattr(module, name), [0]

    def interrupted(*args, **kwargs):
        result = original(*args, **kwargs)
        count[0] += 1
        if count[0] == calls:
            raise Interrupted
        return result
    monkeypatch.setattr(module, name, interrupted)


@pytest.mark.parametrize("run, method, modules, every", [("adamw", "adam-ie", ["head"], 2),
                                                          ("sgd", "sgd-ie", ["all"], 0)])
def test_an_interrupted_adjoint_resumes_from_its_last_resume_point(runs, run, method, modules, every, tmp_path,
                                                                   monkeypatch):
    """``every`` 2: every two steps; 0: at the run's checkpoints (every 3 steps, the whole model replayed)."""
    run_dirs, train, held_out = runs
    options = dict(method=method, modules=modules, form="adjoint", resume_every=every)
    whole = _score(run_dirs[run], tmp_path / "whole", train, held_out, **options)
    steps = whole.summary.run.num_steps
    _interrupt_after(monkeypatch, adjoint_module, "save_adjoint", 2)
    with pytest.raises(Interrupted):
        _score(run_dirs[run], tmp_path / "resumed", train, held_out, **options)
    monkeypatch.undo()
    assert (tmp_path / "resumed" / RESUME_DIR).is_dir() and not (tmp_path / "resumed" / "scores.json").exists()
    walked = []
    original = adjoint_module.restore_adjoint
    monkeypatch.setattr(adjoint_module, "restore_adjoint", lambda *a, **k: walked.append(original(*a, **k)) or walked[-1])
    resumed = _score(run_dirs[run], tmp_path / "resumed", train, held_out, **options)
    inside = sorted(c for c in RunReader(run_dirs[run]).manifest.checkpoints if 0 < c < steps)
    assert walked[0][0] == (steps - 4 if every == 2 else inside[-2])  # the second resume point saved, walking back
    scale = float(whole.scores.abs().max())
    assert scale > 0 and (resumed.scores - whole.scores).abs().max() <= 1e-12 * scale
    for name in ("growth", "objective_growth"):  # the probes resume with the adjoint
        assert resumed.trust[name] == pytest.approx(whole.trust[name], rel=1e-10)
    assert resumed.trust["epoch_growth"] == pytest.approx(whole.trust["epoch_growth"], rel=1e-10)
    assert not (tmp_path / "resumed" / RESUME_DIR).exists()  # removed after success


def test_an_interrupted_forward_form_resumes_from_its_last_chunk_of_rows(runs, tmp_path, monkeypatch):
    run_dirs, train, held_out = runs
    state_bytes = 3 * (16 * 10 + 10) * 8  # adam-ie on the head: (theta, m, v) of 170 parameters, float64
    budget = 10 * 3 * state_bytes / 2**30  # chunks of 10 rows: 5 chunks
    options = dict(method="adam-ie", modules=["head"], form="forward", trust_probes=0)
    whole = _score(run_dirs["adamw"], tmp_path / "whole", train, held_out, **options)
    _interrupt_after(monkeypatch, ResumeStore, "save", 2)
    with pytest.raises(Interrupted):
        _score(run_dirs["adamw"], tmp_path / "resumed", train, held_out, memory_budget_gb=budget, **options)
    monkeypatch.undo()
    chunks = []
    original = estimator_module.sweep
    monkeypatch.setattr(estimator_module, "sweep", lambda rule, plan, *a, **k: chunks.append(plan.start) or
                        original(rule, plan, *a, **k))
    resumed = _score(run_dirs["adamw"], tmp_path / "resumed", train, held_out, memory_budget_gb=budget,
                     schedule="sweep", **options)
    assert chunks == [20, 30, 40]  # rows 0:10 and 10:20 read back from their resume points
    scale = float(whole.scores.abs().max())
    assert (resumed.scores - whole.scores).abs().max() <= 1e-12 * scale
    for name, value in whole.embeddings.items():
        assert (resumed.embeddings[name] - value).abs().max() <= 1e-12 * float(value.abs().max())
    assert not (tmp_path / "resumed" / RESUME_DIR).exists()


def test_a_resume_point_of_other_arguments_is_not_used(tmp_path):
    block = torch.arange(6.0, dtype=torch.float64)
    ResumeStore(tmp_path / "a", "key one").save("adjoint", {"block": block}, step=3)
    assert ResumeStore(tmp_path / "a", "key two").load("adjoint") is None
    tensors, metadata = ResumeStore(tmp_path / "a", "key one").load("adjoint")
    assert torch.equal(tensors["block"], block) and metadata["step"] == "3"
    assert not ResumeStore(tmp_path, "k", every=-1).due(4, 4) and ResumeStore(tmp_path, "k", every=2).due(4, 7)
    assert ResumeStore(tmp_path, "k", boundaries=[3, 6]).due(1, 6) and not ResumeStore(tmp_path, "k", boundaries=[3]).due(3, 4)
    # One resume point per process: a data-parallel adjoint's processes each hold their share of the scores.
    names = {adjoint_name(ShardContext(rank, 2)) for rank in (0, 1)} | {adjoint_name(ShardContext.single())}
    assert len(names) == 3
