"""One step of the model backend (DESIGN.md section 6b) on a MiniLM-shaped BERT: time and peak memory.

Builds BertForSequenceClassification from a config (random init, no download): by default the project's
MiniLM shape (6 layers, hidden 384, 12 heads, intermediate 1536, vocab 30522, 2 labels, 22.7M parameters),
dropout off, on one batch of ``--batch`` rows of ``--tokens`` tokens (a quarter of the rows padded). It
times one plain training step (forward and backward of the mean loss, the model's default attention) and
one step of :class:`ModelCurvature` on the whole model in ``--dtype``: the batch gradient, the per-row
gradients of every row, one HVP and the per-row loss tangents along one vector, and prints peak RSS.
Run it once per process (peak RSS is per process):

    python scripts/bench_model_step.py --dtype float32 --memory_budget_gb 2
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_accinf.curvature.model import ModelCurvature


class OneStep:
    """A one-step trajectory and its states (all rows in one micro-batch)."""

    def __init__(self, model, inputs: dict, labels: torch.Tensor):
        self.params = {name: value.detach() for name, value in model.state_dict().items()}
        self.inputs, self.labels = inputs, labels
        self.row_weight = torch.full((len(labels),), 1.0 / len(labels), dtype=torch.float64)

    def rows_of(self, step: int) -> slice:
        return slice(0, len(self.labels))

    def parameters_at(self, step: int):
        return self.params

    def batch_inputs(self, step: int):
        return [(self.inputs, torch.arange(len(self.labels)))]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(label: str, work):
    start = time.perf_counter()
    result = work()
    print(f"{label:<28s} {time.perf_counter() - start:8.2f} s   peak RSS {peak_rss_gb():6.2f} GB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--memory_budget_gb", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=args.intermediate, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    lengths = torch.full((args.batch,), args.tokens)
    lengths[: args.batch // 4] = args.tokens // 2
    mask = (torch.arange(args.tokens)[None] < lengths[:, None]).long()
    inputs = {"input_ids": torch.randint(1, args.vocab, (args.batch, args.tokens)) * mask, "attention_mask": mask,
              "token_type_ids": torch.zeros(args.batch, args.tokens, dtype=torch.long)}
    labels = torch.randint(0, 2, (args.batch,))
    size = sum(p.numel() for p in model.parameters())
    print(f"{size / 1e6:.1f}M parameters, batch {args.batch} x {args.tokens} tokens, {args.dtype}, "
          f"memory_budget {args.memory_budget_gb} GiB, {args.threads} thread(s); peak RSS at start {peak_rss_gb():.2f} GB")

    def training_step():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(**inputs).logits, labels).backward()

    training_step()  # warm-up
    for _ in range(2):
        timed("plain training step", training_step)
    start = time.perf_counter()
    step = OneStep(model, inputs, labels)
    curvature = ModelCurvature(step, model, [name for name, _ in model.named_parameters()], step,
                               dtype=getattr(torch, args.dtype), memory_budget=int(args.memory_budget_gb * 2**30))
    batch = timed("at_step", lambda: curvature.at_step(0))
    vector = torch.randn(1, curvature.dim, dtype=curvature.dtype)
    timed("batch_grad", lambda: batch.batch_grad)
    grads = timed(f"row_grads ({args.batch} rows)", lambda: batch.row_grads(torch.arange(args.batch)))
    del grads
    timed("hvp (1 vector)", lambda: batch.hvp(vector))
    timed("row_loss_tangents", lambda: batch.row_loss_tangents(vector[0]))
    print(f"model step total {time.perf_counter() - start:.2f} s; per_row path {curvature.per_row}; "
          f"peak RSS {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
