"""DVEmb / ACC-DVEmb with the Gauss-Newton curvature (``curvature="ggn"``, issue 22) against a naive float64
transcription, one sample and one step at a time, on a recorded HF ViT (AdamW, warm-up, clipping, decay).

The oracle builds every row's GGN ``J_r^T (diag p_r - p_r p_r^T) J_r`` as an explicit matrix from the Jacobian
of its logits (``jacrev``), the clip map from the recorded norm, and runs

    x' = (1 - d) x - sum_r w_r R D clip(GGN_r x) + [j in B_t] w_j R D clip(g_j + c GGN_j x)

per sample, unprojected, or projected (``x = R Delta``): ``R (D clip GGN_r) R^T`` as the transition and
``R D clip g_j`` as the injection, which is the matrix ``sum_c (R D clip f_rc)(R f_rc)^T`` the rule builds. ``D_t`` and the
mean decay come from :class:`AdamDisplacement` / the rule (pinned against a simulation in test_dvemb.py).
"""

import pytest
import torch

from hf_accinf import RunReader
from hf_accinf.engine import CorrectionPolicy, estimate_influence
from hf_accinf.errors import AccInfError
from hf_accinf.losses import clip_coefficient
from hf_accinf.methods.dvemb import AdamDisplacement, DVEmbRule
from hf_accinf.methods.registry import build_method
from hf_accinf.problem import problem_from_run
from tests.conftest import record_run
from tests.engine.test_deep_scope import tiny_model
from tests.methods.test_output_hessian import explicit


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, data = tiny_model("vit")
    data = data.select(range(6))
    run_dir = tmp_path_factory.mktemp("vit") / "run"
    record_run(model, data, run_dir, recording={"checkpoint_every": 1}, optim="adamw_torch", learning_rate=0.05,
               lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.01, max_grad_norm=0.3,
               per_device_train_batch_size=3, num_train_epochs=2)
    # a deep scope without gauge tensors (an attention key bias has an exactly zero true gradient, so Adam's
    # displacement there is ~lr/eps and multiplies the round-off in which the two Jacobians differ)
    yield problem_from_run(RunReader(run_dir), modules=["vit.layers.1.mlp", "vit.layernorm", "classifier"],
                           train_dataset=data)
    torch.set_num_threads(threads)


def oracle_embeddings(problem, rule, accumulative: bool, matrix: torch.Tensor | None) -> torch.Tensor:
    curvature, trajectory, spec = problem.curvature, problem.trajectory, problem.optimizer
    displacement = AdamDisplacement(problem, rule.beta1, rule.beta2, rule.eps, torch.zeros_like(rule.decay_rate))
    steps = [None] * trajectory.num_steps
    for t in reversed(range(trajectory.num_steps)):
        batch = curvature.at_step(t)
        jacobian, probs, grads = explicit(problem, batch)
        weights = torch.cat([micro.weights for micro in batch.micros])
        norm = float(trajectory.grad_norm[t])
        clip = clip_coefficient(norm, spec.max_grad_norm)
        batch_grad = (weights[:, None] * grads).sum(0)
        direction = displacement.at(t, batch_grad, clip)
        lam = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        ggn = torch.einsum("rcp,rcd,rdq->rpq", jacobian, lam, jacobian)  # (b, P, P)

        def moved(vectors):  # D clip(e) for rows e (clip map: the rest of the recorded norm held fixed)
            if clip < 1:
                vectors = clip * (vectors - torch.outer(vectors @ batch_grad, batch_grad) / (norm * (norm + 1e-6)))
            return vectors * direction

        inject = moved(grads)
        transition = torch.stack([moved(ggn[r].T).T for r in range(len(weights))])  # D clip GGN_r: (b, P, P)
        if matrix is not None:  # x = R Delta: R (D clip GGN_r) R^T, injections R D clip g_r
            inject, transition = inject @ matrix, matrix.T @ transition @ matrix
        decay = float((problem.learning_rates(t) * rule.decay_rate).mean())
        steps[t] = (trajectory.batch(t), weights, inject, transition, decay)
    results = []
    for j in range(problem.num_samples):
        state = torch.zeros(steps[0][2].shape[1], dtype=torch.float64)
        for ids, weights, inject, transition, decay in steps:
            moved_state = (1 - decay) * state - sum(weights[r] * transition[r] @ state for r in range(len(ids)))
            for r in range(len(ids)):
                if int(ids[r]) == j:
                    moved_state = moved_state + weights[r] * (inject[r] + float(accumulative) * transition[r] @ state)
            state = moved_state
        results.append(state)
    return torch.stack(results)


@pytest.mark.parametrize("method", ["dvemb", "acc-dvemb"])
@pytest.mark.parametrize("projection_dim", [0, 7])
def test_ggn_recursion_equals_the_naive_oracle(problem, method, projection_dim):
    """``k = 0``: the unprojected formula itself; ``k = 7``: the same recursion with the factors projected."""
    rule = DVEmbRule(problem, projection_dim=projection_dim, projection_seed=3, curvature="ggn")
    rule.accumulative = method == "acc-dvemb"
    assert (problem.trajectory.clip_coef < 1).any()
    matrix = None if projection_dim == 0 else rule.projection(torch.eye(problem.curvature.dim, dtype=torch.float64)).T
    expected = oracle_embeddings(problem, rule, method == "acc-dvemb", None if matrix is None else matrix.T)
    policy = CorrectionPolicy("all" if method == "acc-dvemb" else "none")
    for schedule in ("sweep", "propagator"):
        result = estimate_influence(problem, rule, policy=policy, schedule=schedule, progress=False)
        torch.testing.assert_close(result.embeddings, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))


def test_ggn_and_fisher_share_the_injection_and_differ_in_curvature(problem):
    """Same first occurrence (Delta = 0 before it: the injection alone), different propagation after it."""
    fisher, ggn = (build_method(problem, "dvemb", projection_dim=0), DVEmbRule(problem, 0, curvature="ggn"))
    first_f, first_g = fisher.factors(0), ggn.factors(0)
    torch.testing.assert_close(first_f[0], first_g[0])
    assert first_g[3].shape[0] == first_f[3].shape[0] * problem.curvature.num_classes
    assert not torch.allclose(first_f[3], first_g[3][:: problem.curvature.num_classes])


def test_ggn_refuses_the_head_backend():
    from tests.methods.helpers import make_adam_problem

    with pytest.raises(AccInfError, match="model backend"):
        DVEmbRule(make_adam_problem("AdamW", num_samples=4), curvature="ggn")
    with pytest.raises(AccInfError, match="fisher, ggn"):
        DVEmbRule(make_adam_problem("AdamW", num_samples=4), curvature="hessian")
