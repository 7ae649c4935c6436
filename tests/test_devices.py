"""``--device`` and the memory budget (hf_accinf.devices, issue 19 item 1): resolved once in the scoring plan,
checked before any work, and honoured by ``hf-accinf score`` and ``summary --check_replay`` end to end.

The CPU tests run everywhere; the CUDA-marked tests (tests/conftest.py) compare scores computed on a GPU with
the same scores computed on the CPU, form by form, and skip where torch sees no GPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from hf_accinf import AccInfError, ScoreArguments
from hf_accinf.cli import main
from hf_accinf.devices import (CPU_BUDGET_GB, matmul_flags, recorded_precision, resolve_device, resolve_memory_budget,
                               scorer_precision)
from hf_accinf.examples import digits_dataset, tiny_vit
from hf_accinf.scoring import load_scores, score_run
from tests.conftest import record_run

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


# --- resolution ---------------------------------------------------------------------------------------------

def test_auto_is_the_process_device_when_launched_else_a_visible_gpu_else_the_cpu():
    for process in ("cpu", "cpu:1"):  # gloo processes may name their rank
        device, why = resolve_device("auto", process_device=process)
        assert device == torch.device("cpu") and "accelerate" in why
    device, why = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu")[0] == torch.device("cpu")


@pytest.mark.parametrize("choice", ["gpu", "cuda:x", "cuda0", "mps", ""])
def test_unknown_devices_are_refused_by_the_arguments(choice):
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:<index>"):
        ScoreArguments(run_dir="x", device=choice)


@no_gpu
@pytest.mark.parametrize("choice", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_a_clear_error(choice):
    with pytest.raises(AccInfError, match="torch sees none.*--device cpu"):
        resolve_device(choice)


def test_an_explicit_budget_wins_and_the_automatic_one_is_bounded_on_the_cpu(monkeypatch):
    assert resolve_memory_budget(0.5, torch.device("cpu"))[0] == 0.5
    budget, why = resolve_memory_budget(None, torch.device("cpu"))
    assert 0 < budget <= CPU_BUDGET_GB and why.startswith("auto")
    import psutil

    class Scarce:  # 3 GiB available: half of it, not the 4 GiB ceiling
        available = 3 * 2**30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Scarce)
    budget, why = resolve_memory_budget(None, torch.device("cpu"))
    assert budget == pytest.approx(1.5) and "RAM available" in why
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two launched processes on this machine: half each
    assert resolve_memory_budget(None, torch.device("cpu"))[0] == pytest.approx(0.75)


def test_precision_contexts_restore_the_flags():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with matmul_flags(True, False):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, False)
        with recorded_precision({}):  # a manifest without the flags: torch's defaults
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, True)
        assert torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with scorer_precision(torch.device("cpu"), torch.float32):  # nothing changes off CUDA
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_replay_runs_under_the_runs_own_flags_inside_the_scorers():
    """The scorer may allow TF32 for its own products; a states provider wrapped in RecordedPrecision (as
    problem_from_run wraps replay on CUDA) runs every call under the flags the manifest recorded."""
    from hf_accinf.problem import RecordedPrecision

    class States:
        kind = "replay"

        def parameters_at(self, step):
            return step, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    wrapped = RecordedPrecision(States(), {"tf32_matmul": False, "tf32_cudnn": False})
    with matmul_flags(True, True):  # the scorer's context on a GPU
        assert wrapped.parameters_at(3) == (3, False, False)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    assert wrapped.kind == "replay" and not hasattr(wrapped, "report")


# --- end to end on the CPU ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A tiny ViT trained on 48 digits for one epoch with AdamW (``run``) and with plain SGD (``sgd``, every step
    checkpointed: exact theta_t without replay or optimizer state, so that two devices see the same trajectory);
    the data saved for the CLI."""
    root = tmp_path_factory.mktemp("device")
    train, held_out = digits_dataset(48, seed=0), digits_dataset(24, seed=0, offset=48)
    train.save_to_disk(str(root / "train"))
    held_out.save_to_disk(str(root / "eval"))
    record_run(tiny_vit(seed=0, hidden_size=16), train, root / "run", recording={"checkpoint_every": 1},
               per_device_train_batch_size=16, num_train_epochs=1, max_grad_norm=0.5)
    record_run(tiny_vit(seed=0, hidden_size=16), train, root / "sgd", recording={"checkpoint_every": 1},
               per_device_train_batch_size=16, num_train_epochs=1, max_grad_norm=0.5, optim="sgd", learning_rate=0.1)
    return root, train, held_out


def _cli(root, out, *options):
    return main(["score", "--run_dir", str(root / "run"), "--train_data", str(root / "train"), "--eval_data",
                 str(root / "eval"), "--output_dir", str(out), "--trust_probes", "0", *options])


def test_score_on_the_cpu_end_to_end_records_the_device_and_the_budget(digits_run, tmp_path):
    root, _, _ = digits_run
    assert _cli(root, tmp_path / "a", "--device", "cpu") == 0
    summary = json.loads((tmp_path / "a" / "scores.json").read_text())
    plan = summary["plan"]
    assert plan["device"] == "cpu" and plan["reasons"]["device"] == "cpu, as asked"
    assert 0 < plan["memory_budget_gb"] <= CPU_BUDGET_GB and plan["reasons"]["memory_budget"].startswith("auto")
    assert summary["arguments"]["device"] == "cpu" and plan["tf32"] is False
    # --cpu is an alias of --device cpu: the same scores, the same resolved device
    assert _cli(root, tmp_path / "b", "--cpu", "--memory_budget_gb", "1") == 0
    again = json.loads((tmp_path / "b" / "scores.json").read_text())["plan"]
    assert again["device"] == "cpu" and again["memory_budget_gb"] == 1.0
    torch.testing.assert_close(load_scores(tmp_path / "b"), load_scores(tmp_path / "a"), rtol=0, atol=0)


def test_cpu_alias_contradicting_device_is_refused(digits_run, tmp_path, capsys):
    root, _, _ = digits_run
    assert _cli(root, tmp_path / "c", "--cpu", "--device", "cuda") == 2
    assert "--cpu is an alias of --device cpu" in capsys.readouterr().err


@no_gpu
def test_score_on_cuda_without_a_gpu_is_refused_before_any_data_is_read(digits_run, tmp_path, capsys, monkeypatch):
    root, _, _ = digits_run
    import hf_accinf.commands.score as command

    def never(*args, **kwargs):
        raise AssertionError("the training data was read before the device was checked")

    monkeypatch.setattr(command, "load_training_data", never)
    assert _cli(root, tmp_path / "d", "--device", "cuda") == 2
    assert "torch sees none" in capsys.readouterr().err and not (tmp_path / "d").exists()


@no_gpu
def test_summary_check_replay_on_cuda_without_a_gpu_is_refused(digits_run, capsys):
    root, _, _ = digits_run
    assert main(["summary", str(root / "run"), "--check_replay", "--train_data", str(root / "train"),
                 "--device", "cuda"]) == 2
    assert "torch sees none" in capsys.readouterr().err


def test_summary_check_replay_runs_on_the_device_asked(digits_run, capsys):
    root, _, _ = digits_run
    assert main(["summary", str(root / "run"), "--check_replay", "--train_data", str(root / "train"),
                 "--device", "cpu"]) == 0
    assert "checkpoint intervals (within the tolerance 0.0001) on cpu" in capsys.readouterr().out


# --- on a GPU: the same scores as on the CPU ----------------------------------------------------------------

def _scores(digits_run, tmp_path, device: str, name: str, states=None, run: str = "run", **options):
    root, train, held_out = digits_run
    args = ScoreArguments(run_dir=str(root / run), output_dir=str(tmp_path / f"{name}-{device}"), device=device,
                          allow_tf32=False, trust_probes=0, **options)
    result = score_run(args, train, held_out, progress=False, states=states)
    assert result.summary.plan["device"].startswith(device)
    return result


def _checkpoint_states(digits_run):
    from hf_accinf.inputs.collate import eval_collator
    from hf_accinf.problem import CheckpointStates
    from hf_accinf.trajectory import RunReader

    root, train, _ = digits_run
    run = RunReader(root / "sgd")
    return CheckpointStates(run, train, eval_collator(run.build_model(), None, None))


def _assert_close(cuda: torch.Tensor, cpu: torch.Tensor, dtype: torch.dtype) -> None:
    """float64: 1e-8 relative to the score vector's norm; float32: 1e-4 of it (kernels sum in other orders)."""
    tolerance = 1e-8 if dtype == torch.float64 else 1e-4
    error = (cuda.cpu().double() - cpu.double()).norm() / cpu.double().norm()
    assert error <= tolerance, f"cuda vs cpu: relative error {error:.2e} above {tolerance:g}"


CASES = {  # name: (score options, whether the SGD run's exact trajectory is read from its per-step checkpoints)
    "head": (dict(modules=["head"]), False),  # AdamW: acc-adam-ie, the recorded head inputs and moments
    "adjoint": (dict(), True),
    "forward": (dict(method="sgd-ie", form="forward", modules=["last:1"]), True),
    "dvemb": (dict(method="dvemb", projection_dim=64, modules=["last:1"]), True),
    "tracin": (dict(method="tracin", modules=["last:1"]), True),
    "verify": (dict(modules=["head"], verify=4), False),
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_scores_on_cuda_equal_scores_on_the_cpu(digits_run, tmp_path, case, dtype):
    options, exact = CASES[case]
    on = {device: _scores(digits_run, tmp_path, device, case, _checkpoint_states(digits_run) if exact else None,
                          "sgd" if exact else "run", dtype=dtype, **options) for device in ("cpu", "cuda")}
    _assert_close(on["cuda"].scores, on["cpu"].scores, getattr(torch, dtype))
    if case == "verify":  # the same rows retrained out; float32 retraining on two devices, and the truth is a
        # difference of nearby losses: within 1e-2 of its norm
        cuda, cpu = on["cuda"].verify, on["cpu"].verify
        assert cuda["rows"] == cpu["rows"]
        truth = torch.tensor(cpu["truth"], dtype=torch.float64)
        assert (torch.tensor(cuda["truth"], dtype=torch.float64) - truth).norm() <= 1e-2 * truth.norm()


@pytest.mark.cuda
def test_the_replay_runs_on_the_gpu_and_stays_within_its_tolerance(digits_run, tmp_path):
    """The default path: a CPU-trained run replayed on the GPU (float32 kernels in another order), scored there."""
    result = _scores(digits_run, tmp_path, "cuda", "replayed")
    assert result.replay is not None and result.replay["ok"]
    reference = _scores(digits_run, tmp_path, "cpu", "replayed")
    error = (result.scores.cpu() - reference.scores).norm() / reference.scores.norm()
    assert error <= 1e-3, f"replayed on cuda vs cpu: relative error {error:.2e}"


@pytest.mark.cuda
def test_tf32_on_a_gpu_is_planned_and_its_fidelity_cost_printed(digits_run, tmp_path):
    """TF32 (10-bit mantissa, unit round-off 2^-11) for the scorer's float32 products: planned on CUDA only, and
    its cost against float64 on the CPU printed for docs/ENGINE.md (the bound is a sanity check, not the claim)."""
    root, train, held_out = digits_run
    scores = {}
    for name, device, dtype, tf32 in (("tf32", "cuda", "float32", True), ("exact", "cpu", "float64", False)):
        args = ScoreArguments(run_dir=str(root / "sgd"), output_dir=str(tmp_path / name), device=device, dtype=dtype,
                              allow_tf32=tf32, trust_probes=0)
        result = score_run(args, train, held_out, progress=False, states=_checkpoint_states(digits_run))
        assert result.summary.plan["tf32"] is tf32
        scores[name] = result.scores.double()
    error = float((scores["tf32"] - scores["exact"]).norm() / scores["exact"].norm())
    print(f"TF32 float32 whole-model sgd-ie adjoint on cuda vs float64 on cpu: relative error {error:.2e}")
    assert error < 1e-2


@pytest.mark.cuda
def test_the_command_scores_on_a_gpu_and_writes_the_column(digits_run, tmp_path):
    """`hf-accinf score --device cuda` end to end: the plan names the GPU, the results come back to the host for
    the files and the dataset column, and they equal the CPU's (the head in float64)."""
    root, _, _ = digits_run
    for device in ("cuda", "cpu"):
        assert _cli(root, tmp_path / device, "--device", device, "--modules", "head") == 0
    plan = json.loads((tmp_path / "cuda" / "scores.json").read_text())["plan"]
    assert plan["device"].startswith("cuda") and plan["reasons"]["memory_budget"].startswith("auto")
    _assert_close(load_scores(tmp_path / "cuda"), load_scores(tmp_path / "cpu"), torch.float64)
    assert (tmp_path / "cuda" / "dataset").is_dir()
