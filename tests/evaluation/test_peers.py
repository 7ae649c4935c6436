"""The peers' adapters (:mod:`hf_accinf.evaluation.peers`) on tiny HF models built from configs.

Oracles: the exact leave-one-out effects by replay (:func:`~hf_accinf.scoring.verify.leave_one_out_effects`) on a
stable SGD run, where every first-order estimate with the right sign correlates positively with the truth (a
flipped sign or a wrong row order correlates negatively or not at all); for TRAK and K-FAC (see
``SELF_INFLUENCE_PEERS``), self-influence: with one training row as the only evaluation row, that row is among
the three rows whose removal raises its loss most. Invariants: the model the peers call gives the
HF model's logits (padding included); the last per-epoch checkpoint is the trained model.
"""

import captum  # noqa: F401  the peers extra (and kronfluence, --no-deps): a missing peer fails here, never skips
import dattri  # noqa: F401
import kronfluence  # noqa: F401
import numpy as np
import pytest
import torch
import trak  # noqa: F401
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

from hf_accinf import RunReader
from hf_accinf.errors import AccInfError
from hf_accinf.evaluation.peers import PEERS, available, peer_problem, score_peer
from hf_accinf.evaluation.peers.problem import LogitsModel
from hf_accinf.examples import digits_dataset, tiny_vit
from hf_accinf.scoring.verify import leave_one_out_effects
from tests.conftest import record_run

ROWS = 24
SGD = dict(optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
           per_device_train_batch_size=8, num_train_epochs=2)
# TRAK's single-model scores carry no loss scale; K-FAC's Fisher from 24 rows' sampled labels is too noisy to
# rank this objective's leave-one-out effects. Both are checked on self-influence, a property of any positive
# (semi-)definite preconditioner: with row j as the query its own score is g_j^T (F + lambda)^-1 g_j.
SELF_INFLUENCE_PEERS = {"trak", "dattri-trak", "kronfluence-kfac"}


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A tiny ViT trained whole by SGD (a stable run), its peer problem and the leave-one-out truth of every row."""
    run_dir = tmp_path_factory.mktemp("peers") / "run"
    train, held_out = digits_dataset(ROWS, seed=0), digits_dataset(ROWS, seed=0, offset=ROWS)
    record_run(tiny_vit(hidden_size=16), train, run_dir, recording={"checkpoint_every": 3}, **SGD)
    truth = leave_one_out_effects(RunReader(run_dir), train, None, held_out, list(range(ROWS)), progress=False)
    return run_dir, train, held_out, peer_problem(run_dir, train, held_out), truth.zero.numpy()


def test_every_peer_is_installed():
    assert available() == list(PEERS)


def test_epochs_end_at_the_trained_model(vit):
    run_dir, _, _, problem, _ = vit
    final = RunReader(run_dir).build_model().state_dict()
    assert len(problem.epochs) == SGD["num_train_epochs"]
    assert all(torch.equal(problem.epochs[-1].state[name], final[name]) for name in final)
    assert all(epoch.learning_rate == pytest.approx(SGD["learning_rate"]) for epoch in problem.epochs)


@pytest.mark.parametrize("name", [name for name in PEERS if name not in SELF_INFLUENCE_PEERS])
def test_first_order_peers_agree_in_sign_with_leave_one_out(vit, name):
    *_, problem, zero = vit
    scores = score_peer(name, problem)
    assert scores.shape == (ROWS,) and scores.dtype == torch.float64 and torch.isfinite(scores).all()
    assert np.corrcoef(scores.numpy(), zero)[0, 1] > 0.5


@pytest.mark.parametrize("name", sorted(SELF_INFLUENCE_PEERS))
def test_a_row_ranks_among_the_first_for_its_own_loss(vit, name):
    run_dir, train, *_ = vit
    for row in (0, 5):
        problem = peer_problem(run_dir, train, train.select([row]), with_epochs=False)
        scores = score_peer(name, problem)
        assert scores.shape == (ROWS,) and torch.isfinite(scores).all()
        assert (scores > scores[row]).sum() <= 2


def test_the_peers_model_gives_the_hf_logits_with_padding():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32,
                                                     max_position_embeddings=16)).eval()
    ids = torch.randint(3, 30, (3, 8))
    mask = torch.ones_like(ids)
    mask[0, 5:], mask[2, 3:] = 0, 0
    wrapped = LogitsModel(model, ["input_ids", "attention_mask"])
    model.set_attn_implementation("eager")
    with torch.no_grad():
        assert torch.allclose(wrapped(ids, mask), model(input_ids=ids, attention_mask=mask).logits, atol=1e-6)
        assert torch.func.vmap(lambda i, m: wrapped(i[None], m[None])[0])(ids, mask).shape == (3, 2)


def test_unknown_peer_is_refused(vit):
    with pytest.raises(AccInfError, match="Unknown peer"):
        score_peer("magic", vit[3])


def test_text_rows_reach_a_vmapped_peer(tmp_path):
    """Padded text rows through dattri's per-row vmap (the 4D mask path), scores in the convention."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 9, size=16)
    ids = [rng.integers(3, 30, size=n).tolist() for n in lengths]
    data = Dataset.from_dict({"input_ids": [i + [0] * (8 - len(i)) for i in ids],
                              "attention_mask": [[1] * len(i) + [0] * (8 - len(i)) for i in ids],
                              "labels": [int(7 in i) for i in ids]}).with_format("torch")
    record_run(BertForSequenceClassification(config), data, tmp_path / "run", **SGD)
    problem = peer_problem(tmp_path / "run", data, data)
    scores = score_peer("dattri-tracin", problem)
    assert scores.shape == (16,) and torch.isfinite(scores).all()
