"""The recorder's captures, moved to the CPU once per optimizer step (asynchronously on CUDA), equal what an
independent observer copies synchronously inside every training step.

The observer is the test's own hooks on the same head and model (a plain clone at each call, as the
recorder did before it deferred its copies): the recorded head inputs, labels and random states must be
bitwise those, and the recorded row weights those measured from the observer's logits and logit gradients.
"""

import pytest
import torch

from hf_accinf import RunReader
from hf_accinf.examples import synthetic_text_dataset, tiny_bert
from hf_accinf.recording.capture import MicroBatch, measure_row_weights, to_host
from tests.conftest import record_run


class Observer:
    """Synchronous copies of every training micro-batch's head input, logits, logit gradient, labels and CPU
    random state."""

    def __init__(self, model):
        self.inputs, self.logits, self.grads, self.labels, self.rng = [], [], [], [], []
        model.classifier.register_forward_hook(self._head)
        model.register_forward_pre_hook(self._model, with_kwargs=True)

    def _model(self, module, args, kwargs):
        if torch.is_grad_enabled():
            self.labels.append(kwargs["labels"].detach().cpu().clone())
            self.rng.append(torch.get_rng_state())

    def _head(self, module, args, output):
        if not torch.is_grad_enabled():
            return
        self.inputs.append(args[0].detach().cpu().clone())
        self.logits.append(output.detach().float().cpu().clone())
        output.register_hook(lambda grad: self.grads.append(grad.detach().float().cpu().clone()))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_the_recorded_captures_equal_an_independent_synchronous_copy(tmp_run, device):
    data = synthetic_text_dataset(num_rows=20)
    model = tiny_bert()
    observer = Observer(model)
    record_run(model, data, tmp_run, use_cpu=device == "cpu", per_device_train_batch_size=3,
               gradient_accumulation_steps=2, num_train_epochs=1, learning_rate=3e-3, max_grad_norm=0.5)
    trajectory = RunReader(tmp_run).trajectory()
    assert len(observer.inputs) == len(observer.grads) == len(trajectory.micro_size) == 7  # ceil(20 / 3)
    assert torch.equal(trajectory.head_input, torch.cat(observer.inputs))
    assert torch.equal(trajectory.labels, torch.cat(observer.labels))
    assert torch.equal(trajectory.rng_cpu, torch.stack(observer.rng))
    assert trajectory.micro_size.tolist() == [len(labels) for labels in observer.labels]
    weights = [measure_row_weights(MicroBatch(torch.arange(len(labels)), labels, head_input, logits, grad), 0.0)
               for labels, head_input, logits, grad in zip(observer.labels, observer.inputs, observer.logits,
                                                           observer.grads)]
    assert torch.equal(trajectory.row_weight, torch.cat(weights))
    assert (trajectory.rng_cuda is not None) == (device == "cuda")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_to_host_copies_where_asked_and_keeps_every_value(device):
    tensors = [torch.randn(3, 4, device=device), None, torch.arange(5, device=device)]
    hosts = to_host(tensors, copy=[True, False, False])
    assert hosts[1] is None and all(host.device.type == "cpu" for host in (hosts[0], hosts[2]))
    assert torch.equal(hosts[0], tensors[0].cpu()) and torch.equal(hosts[2], tensors[2].cpu())
    tensors[0].add_(1)  # a copy does not follow its source
    assert not torch.equal(hosts[0], tensors[0].cpu())
    if device == "cpu":
        assert hosts[2] is tensors[2]  # no copy asked for, none made
    else:
        assert hosts[0].is_pinned()
