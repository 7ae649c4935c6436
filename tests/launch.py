"""Subprocesses of the tests: the ``hf-accinf`` CLI and ``accelerate launch`` process groups.

Every subprocess gets this checkout first on ``PYTHONPATH`` and one timeout, ``HF_ACCINF_TEST_TIMEOUT``
seconds (default 900: a busy 2-core CI machine runs a 2-process launch in 10-60 s). A timeout fails the test
with the command, the time it ran and the tail of its output instead of a bare ``TimeoutExpired``. Launches let
accelerate pick the rendezvous port (``--main_process_port 0``): no port is probed here and released for
another process to take.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = float(os.environ.get("HF_ACCINF_TEST_TIMEOUT", "900"))
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
          "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment with this checkout first on ``PYTHONPATH`` (also for the ``hf-accinf`` entry point)."""
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **extra}


def _tail(text) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-3000:]


def run_command(command: list[str], check: bool = True, env: dict[str, str] | None = None,
                cwd: Path | str = ROOT) -> subprocess.CompletedProcess:
    """Run ``command`` to completion; fail the test on a timeout, and on a non-zero exit when ``check``."""
    began = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=cwd,
                                env=env or subprocess_env())
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"{' '.join(map(str, command))} ran past {TIMEOUT_S:.0f} s (HF_ACCINF_TEST_TIMEOUT raises it); "
                    f"stdout: {_tail(expired.stdout)}\nstderr: {_tail(expired.stderr)}")
    if check:
        assert result.returncode == 0, (f"exit {result.returncode} after {time.perf_counter() - began:.0f} s: "
                                        f"{' '.join(map(str, command))}\n{_tail(result.stderr)}")
    return result


def launch_two_processes(*script: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2`` (CPU, gloo) of a script or ``-m module`` and its arguments."""
    return run_command([*LAUNCH, *map(str, script)], env=env)


def hf_accinf(*arguments: str | Path, check: bool = True, cwd: Path | str = ROOT) -> subprocess.CompletedProcess:
    """The installed ``hf-accinf`` command on this checkout."""
    return run_command(["hf-accinf", *map(str, arguments)], check=check, cwd=cwd)
