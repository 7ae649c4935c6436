"""The DVEmb projection is the same matrix on every device and process (issue 19 item 1, DESIGN.md section 5):
it is drawn on the host in float64, block by block from seeded generators, then moved to the device."""

from __future__ import annotations

import pytest
import torch

from hf_accinf.methods.projection import BLOCK, GradientProjection, projection_fingerprint, same_projection

INPUT, OUTPUT = BLOCK + 37, 8  # two column blocks, the second partial


def test_the_device_path_moves_the_host_draw_unchanged(monkeypatch):
    """A projection for another device (meta here, CUDA on a GPU) is built by moving exactly the blocks the CPU
    projection is made of: nothing is drawn on the device."""
    host = GradientProjection(INPUT, OUTPUT, seed=3).matrix()
    moved = []
    to = torch.Tensor.to

    def recording(self, *args, **kwargs):
        result = to(self, *args, **kwargs)
        if result.device.type == "meta" and self.device.type == "cpu":
            moved.append(self.clone())
        return result

    monkeypatch.setattr(torch.Tensor, "to", recording)
    other = GradientProjection(INPUT, OUTPUT, seed=3, device="meta")
    assert other.matrix().device.type == "meta" and other.matrix().shape == host.shape
    assert torch.equal(torch.cat(moved, dim=1), host)  # bitwise: the same draw, moved


def test_the_fingerprint_names_the_draw_and_not_the_memory_path():
    whole = GradientProjection(INPUT, OUTPUT, seed=3)
    blocks = GradientProjection(INPUT, OUTPUT, seed=3, memory_gb=1e-9)  # regenerated block by block at each use
    assert whole._matrix is not None and blocks._matrix is None
    assert torch.equal(whole.matrix(), blocks.matrix())
    assert same_projection(projection_fingerprint(whole), projection_fingerprint(blocks))  # sums in other orders
    assert not same_projection(projection_fingerprint(GradientProjection(INPUT, OUTPUT, seed=4)),
                               projection_fingerprint(whole))


@pytest.mark.cuda
def test_the_projection_on_a_gpu_is_the_cpu_projection():
    host = GradientProjection(INPUT, OUTPUT, seed=3)
    device = GradientProjection(INPUT, OUTPUT, seed=3, device="cuda")
    assert torch.equal(device.matrix().cpu(), host.matrix())
    assert same_projection(projection_fingerprint(device), projection_fingerprint(host))
