"""What every curvature backend offers the update rules: per-step batch curvature of the head's loss.

A backend knows the head, its recorded inputs and parameters at every step, and the loss; it never
knows which method or schedule asks. Vectors live in the backend's own flat layout of the chosen
parameters (dimension ``P``); :meth:`HeadCurvature.unflatten` names them.

For step ``t`` with batch rows ``r`` (weights ``w_r``), :class:`BatchCurvature` gives
``H_B X = sum_r w_r H_r X`` for a block of vectors (DESIGN.md section 3, the shared transition),
the per-row gradients ``g_r`` and per-row products ``H_r x_r`` (the per-occurrence terms), the per-row
loss tangents ``g_r . v`` along one vector (first-order injections and TracIn without per-row gradients),
and the batch gradient ``G_S = sum_r w_r g_r``. The objective side (:meth:`HeadCurvature.objective_grad`,
``example_grads``, ``shifted_losses``) takes an evaluation set in the backend's own input form, made by
:meth:`HeadCurvature.evaluation_inputs`: head inputs for head backends, model inputs for the model backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class BatchCurvature(ABC):
    batch_grad: torch.Tensor  # (P,)
    row_weight: torch.Tensor  # (b,)

    @abstractmethod
    def hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        """``H_B`` applied to each row of ``vectors`` (K, P)."""

    def hvp_add(self, vectors: torch.Tensor, base: torch.Tensor | None, scale: float) -> torch.Tensor:
        """``base + scale * H_B vectors`` (a backend may fuse the sum into its last product)."""
        product = self.hvp(vectors)
        return scale * product if base is None else base + scale * product

    @abstractmethod
    def row_grads(self, rows: torch.Tensor) -> torch.Tensor:
        """Unweighted gradients ``g_r`` (m, P) of the batch rows ``rows`` (positions in the batch)."""

    @abstractmethod
    def row_hvp(self, vectors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``H_r x`` for each pair of batch row ``rows[i]`` and vector ``vectors[i]``."""

    def keep_row_grads(self) -> None:
        """A hint that every row's gradient will be asked for (exact removal: every row of a step belongs to a
        removed sample): a backend may compute them once, keep them, and take the batch gradient as their
        weighted sum (one backward pass less). The default does nothing."""

    def restrict(self, rows: torch.Tensor) -> "BatchCurvature":
        """The batch of the rows ``rows`` only, positions in the step unchanged: its batch gradient and ``H_B X`` sum
        those rows (the others weigh 0); per-row quantities are asked of those rows only. The adjoint's row split
        (:mod:`hf_accinf.engine.sharding`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be split by rows over processes")

    def row_loss_tangents(self, vector: torch.Tensor) -> torch.Tensor:
        """``d/de l_r(theta + e v)`` at ``e = 0`` for every batch row ``r`` (b,), i.e. ``g_r . v`` (unweighted).
        Backends override this default (per-row gradients) with one forward-mode pass for the batch."""
        return self.row_grads(torch.arange(len(self.row_weight), device=self.row_weight.device)) @ vector


class HeadCurvature(ABC):
    dim: int

    @abstractmethod
    def at_step(self, step: int) -> BatchCurvature:
        """Curvature of step ``step``'s batch at the recorded parameters before that step."""

    @abstractmethod
    def expand(self, per_parameter: dict[str, float]) -> torch.Tensor:
        """A (P,) vector holding each chosen parameter's value on its coordinates (learning rates, decay)."""

    @abstractmethod
    def unflatten(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split (..., P) into the chosen parameters' shapes."""

    def flatten_named(self, named: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`unflatten` for (N, *shape) tensors named by chosen parameter."""
        probe = torch.arange(self.dim, dtype=torch.float64)
        layout = self.unflatten(probe)
        count = next(iter(named.values())).shape[0]
        flat = torch.empty(count, self.dim, dtype=next(iter(named.values())).dtype)
        for name, positions in layout.items():
            flat[:, positions.long().flatten()] = named[name].reshape(count, -1).to(flat.dtype)
        return flat

    def optimizer_state(self, step: int, key: str) -> torch.Tensor:
        """The chosen parameters' recorded optimizer state ``key`` before step ``step`` (e.g. ``"exp_avg"``,
        ``"exp_avg_sq"``, ``"momentum_buffer"``; trajectory.states ``"<param>.<key>"``), (P,) in this layout.
        ``key="param"`` gives the recorded parameters themselves. A backend without ``trajectory`` and
        ``chosen`` attributes overrides this."""
        source = self.trajectory.params if key == "param" else self.trajectory.states
        suffix = "" if key == "param" else f".{key}"
        missing = [name for name in self.chosen if name + suffix not in source]
        if missing:
            from ..errors import AccInfError

            raise AccInfError(f"The run did not record the optimizer state '{key}' of {missing}: "
                              "the method needs a run recorded with the optimizer it models.")
        if self.device.type != "cpu":  # one copy to the device per key, then a slice per step (no copy in the loop)
            cache = self.__dict__.setdefault("_device_states", {})
            if key not in cache:
                every = {name: source[name + suffix] for name in self.chosen}
                cache[key] = self.flatten_named(every).to(self.device, self.dtype)
            return cache[key][step]
        named = {name: source[name + suffix][step][None] for name in self.chosen}
        return self.flatten_named(named)[0].to(self.device, self.dtype)

    def evaluation_inputs(self, model, head_name: str, dataset, collate_fn=None, tokenizer=None):
        """``(inputs, labels)`` of an evaluation set in this backend's input form (here: the head's inputs,
        eval mode, batches collated as the Trainer would), for :meth:`example_grads`, :meth:`objective_grad`
        and :meth:`shifted_losses`."""
        from ..inputs.evaluation import head_inputs

        return head_inputs(model, head_name, dataset, collate_fn=collate_fn, tokenizer=tokenizer)

    def parameters_at(self, step: int) -> dict[str, torch.Tensor]:
        """The parameters this backend's objective side takes, before step ``step`` (head backends: the head's)."""
        steps = getattr(self, "_step_params", None) or self.trajectory.params  # the device copy, when a backend keeps one
        return {name: values[step] for name, values in steps.items()}

    @abstractmethod
    def example_grads(self, params: dict[str, torch.Tensor], inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-example loss gradients (V, P) at head parameters ``params``."""

    @abstractmethod
    def objective_grad(self, params: dict[str, torch.Tensor], inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Gradient (P,) of the mean loss over ``inputs``/``labels`` at head parameters ``params``."""

    @abstractmethod
    def shifted_losses(self, params: dict[str, torch.Tensor], shifts: torch.Tensor, inputs: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
        """Mean loss over ``inputs`` at ``params`` moved by each row of ``shifts`` (K, P): (K,)."""


class FlatLayout:
    """The layout of backends whose vectors are the chosen parameters flattened and concatenated in order
    (``chosen`` names, their ``shapes`` and ``sizes``; ``device`` and ``dtype``)."""

    chosen: list[str]
    shapes: dict[str, torch.Size]
    sizes: list[int]

    def flatten(self, named: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([named[name].to(self.device, self.dtype).reshape(-1) for name in self.chosen])

    def unflatten(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(vectors, self.sizes, dim=-1)
        return {name: part.reshape(*vectors.shape[:-1], *shape) for (name, shape), part in zip(self.shapes.items(), parts)}

    def expand(self, per_parameter: dict[str, float]) -> torch.Tensor:
        return torch.cat([torch.full((size,), float(per_parameter[name]), dtype=self.dtype, device=self.device)
                          for name, size in zip(self.chosen, self.sizes)])
