"""Two launched processes each own half of the rows of a deep scope; gathered embeddings equal one process's."""

import pytest
import torch
from safetensors.torch import load_file

from hf_accinf import RunReader
from hf_accinf.problem import problem_from_run
from tests.conftest import record_run
from tests.engine.helpers import estimate
from tests.engine.test_deep_scope import tiny_model
from tests.launch import ROOT, launch_two_processes


@pytest.mark.slow
def test_two_processes_reproduce_the_single_process_deep_scope_embeddings(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, data = tiny_model("bert")
        record_run(model, data, tmp_path / "run", recording={"checkpoint_every": 1}, optim="sgd",
                   optim_args="momentum=0.9", learning_rate=0.5, max_grad_norm=0.5, per_device_train_batch_size=3,
                   num_train_epochs=2)
        data.save_to_disk(str(tmp_path / "data"))
        out = tmp_path / "sharded.safetensors"
        launch_two_processes(ROOT / "tests/scripts/estimate_deep_scope_distributed.py", tmp_path / "run",
                             tmp_path / "data", out)
        sharded = load_file(out)
        assert int(sharded["world_size"]) == 2
        problem = problem_from_run(RunReader(tmp_path / "run"), modules=["last:1"], train_dataset=data)
        for method in ("sgd-ie", "acc-sgd-ie"):
            single = estimate(problem, method, schedule="sweep", progress=False).embeddings
            assert sharded[method].shape == single.shape
            torch.testing.assert_close(sharded[method], single, rtol=1e-12, atol=1e-15)
    finally:
        torch.set_num_threads(threads)
