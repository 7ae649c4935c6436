"""Peers side by side: every installed peer and hf_accinf's methods on the same recorded HF runs, against the
same exact truth (issue 20, item 3). Regenerates docs/PEERS.md.

For each case of the fidelity benchmark (``scripts/bench_fidelity.py``'s builders: tiny BERT on Rotten Tomatoes,
tiny ViT on digits, trained whole with the HF AdamW recipe; and the ViT trained 12 epochs at lr 1e-3, a model
that learns) this script

1. trains and records the run, and retrains by replay (one batched retraining): ``--truth_rows`` rows one at a
   time (weight 0 and 0.5: leave-one-out truth and its linearity ceiling) and ``--lds_subsets`` random subsets
   at each of ``--lds_fractions`` (weight 0 and 0.5: the objective-level LDS truth and its ceiling);
2. scores every training row with each hf_accinf method (whole-model adjoint, head, TracIn, DVEmb) and each
   installed peer (:mod:`hf_accinf.evaluation.peers`), each in a forked process that reports its wall time and
   its peak resident memory;
3. writes one table per case: Kendall tau, Pearson r, Jaccard@10 against leave-one-out, the objective-level
   LDS (Spearman, over subsets, of the summed scores against the measured change of the mean evaluation loss)
   at each fraction, seconds and peak RSS;
4. and, in dattri's LDS setting (its benchmark retrains models from scratch on random halves of the training
   set), ``--scratch_subsets`` models each trained on a random 50% of the rows with the run's recipe and
   initialisation but a batch order of its own (seed), their mean evaluation loss against the summed scores
   of the removed half: the field's truth, noisier than replay (a new batch order moves the model too).

    python scripts/bench_peers.py --threads 1 --output docs/PEERS.md
    python scripts/bench_peers.py --threads 1 --cases image --rows 48 --truth_rows 24 --lds_subsets 8   # quick look
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fidelity  # noqa: E402  (the cases, the training recipe and the leave-one-out truth)

from hf_accinf import RunReader, ScoreArguments, score_run  # noqa: E402
from hf_accinf.evaluation.metrics import jaccard, kendall_tau  # noqa: E402
from hf_accinf.evaluation.peers import PEERS, available, peer_problem, score_peer  # noqa: E402
from hf_accinf.inputs.evaluation import evaluation_batches  # noqa: E402
from hf_accinf.scoring.retraining import BatchedRetraining  # noqa: E402

OURS = {  # hf_accinf's methods: ScoreArguments of each row
    "hf_accinf whole-model adjoint (default)": dict(method="auto", modules=["all"], form="adjoint"),
    "hf_accinf head": dict(method="auto", modules=["classifier"]),
    "hf_accinf TracIn (whole model)": dict(method="tracin", modules=["all"]),
    "hf_accinf DVEmb (whole model, k=512)": dict(method="dvemb", modules=["all"], projection_dim=512),
}

CASES = {  # name: (builder, epochs, AdamW learning rate); None: the command line's --epochs / --adamw_lr
    "text": ("text_case", None, None),
    "image": ("image_case", None, None),
    "image-long": ("image_case", 12, 1e-3),  # a model that learns: evaluation loss well below chance, still stable
}

STATIC = """\
## Reading the tables

The sentence under each table is computed, not written: it lists every peer that beats the default
whole-model adjoint on a figure of that case. What explains the figures, on these runs:

* **The trajectory, not the optimum.** The runs are short AdamW runs with warm-up, decay and clipping, far
  from a minimum of the training loss (evaluation loss near chance on text and image; image-long learns).
  Influence functions (kronfluence EK-FAC/K-FAC, dattri's CG) assume the final model minimises the training
  loss and take the curvature there; the truth here is the recorded run retrained without the row. hf_accinf's
  default differentiates that run (its AdamW steps, schedule and clipping), so it has no such premise to
  miss. On the two cases that barely learn, the curvature-free gradient dot (kronfluence identity) does about
  as well as or better than EK-FAC: the inverse curvature of a point that is no minimum is what costs the
  influence function there. On image-long, a model that learns, the curvature methods (K-FAC, EK-FAC, CG)
  move ahead of the gradient dot and of TracIn, and all stay far below the default, which follows the run.
* **LDS intervals.** Each LDS is a Spearman correlation over the subsets; its 95% bootstrap interval over
  them is given. A peer that beats the default by less than that spread has not beaten it. Jaccard@10 compares
  the ten highest of the 64 rows with a truth: one row in or out moves it by about 0.1.
* **TracIn is one estimator in three packages.** dattri's TracIn and captum's TracInCP compute the same sum
  over the same per-epoch checkpoints and agree with each other; hf_accinf's TracIn (DESIGN.md section 5)
  sums over every occurrence of the row, at the parameters before its step with that step's learning rate.
  None models the optimizer's state (Adam's moments).
* **DVEmb.** dattri's DVEmb is the SGD form (the paper's); hf_accinf's models AdamW's preconditioner, so on
  these AdamW runs the two differ by more than their projections.
* **TRAK is run outside its regime.** TRAK's recommended use ensembles many independently trained models;
  scoring the one trained model hf_accinf scores, both TRAK packages rank rows poorly here. Training an
  ensemble would cost about as much as retraining, which is the truth itself on models this small.
* **Cost.** On models this small every method takes seconds; the process's peak resident memory is mostly
  the parent's libraries, model and data (about the same for every row). The seconds come from a machine
  shared with other work (2 cores): compare them within a table, not across runs.

* **dattri's setting (LDS 50% from scratch).** dattri's LDS benchmark retrains models from scratch on random
  halves of the training set. The last LDS column does that on these runs: 24 models per case, each the recipe
  from the run's initialisation on a random half of the rows with a batch order of its own, and the Spearman
  correlation of their mean evaluation loss with the summed scores of the removed half. That truth asks another
  question than the replayed columns: not what removing rows does to the run you trained (same order, same
  noise), but what a fresh run on half the data does on average, a counterfactual far from the recorded run
  (half the rows gone, every step's batch different). On text, where the model barely moves, every method but
  TRAK agrees (0.83-0.97). On the image runs the curvature-free methods that sum gradient similarities over
  the trajectory lead (image: kronfluence identity 0.935, captum TracInCP 0.927, hf_accinf TracIn 0.919, against
  the default's 0.680; image-long: captum 0.607, K-FAC 0.580, dattri TracIn 0.551, against 0.290). The default's
  first-order scores describe small removals from the one run (the replayed columns, where it leads); at half
  the data and a new order they are outside their regime, and the averaged gradient similarities, which ignore
  the run's order and curvature, predict the average retraining better. This is a reduced version of dattri's
  protocol: objective-level (the mean evaluation loss, not one LDS per test row), 24 models rather than
  dattri's 50-100, the recorded run's own small models rather than its MNIST/CIFAR ones.

Not measured here: the per-query LDS (it needs one score per evaluation row; hf_accinf's default scores the
mean evaluation loss, so the LDS above is objective-level); 1% subsets (1% of 128 rows is one row: the
leave-one-out columns); kronfluence's example protocols (UCI regression, CIFAR-10, language models: none of
their data is offline here).

## Installing the peers next to the pinned CPU torch

Checked on this project's machine with `pip install --dry-run -c constraints.txt PEER`, then installed in a
throwaway virtual environment that sees the pinned packages (`python -m venv --system-site-packages`) and
imported (torch 2.13.0+cpu, transformers 5.24.0):

| peer | version | pulls in | installs | imports | in the `peers` extra |
|---|---|---|---|---|---|
| captum | 0.9.0 | nothing new | 2 s, 4 MB | yes | yes |
| dattri | 0.3.0 | pretty_midi, mido, importlib_resources (its music benchmark) | 1 s, 9 MB | yes | yes |
| traker (`import trak`) | 0.3.2 | nothing new (the CUDA projector `fast_jl` is optional: the CPU path uses `BasicProjector`) | 4 s (sdist) | yes | yes |
| kronfluence | 1.0.1 | einops, einconv, opt_einsum, **torchvision 0.28.0** | 3 s, 25 MB | only without torchvision | no: `pip install --no-deps kronfluence` plus einops, einconv, opt_einsum (in the extra) |
| bergson | 2.5.1 | **torchvision 0.28.0, torchaudio 2.11.1**, bitsandbytes 0.50.2 (125 MB), peft, torchopt, jaxtyping, simple-parsing, ml_dtypes, optree ... | 3 s, 190 MB | only without torchvision and torchaudio | no |

The one registry wheel of torchvision for torch 2.13 is a CUDA build: next to the CPU torch its extension
fails to load (`operator torchvision::nms does not exist`) and, since transformers imports torchvision when it
is installed, `from transformers import PreTrainedModel` fails too: **installing kronfluence or bergson with
their dependencies breaks the project's environment**. torchaudio 2.11.1 (the newest on the registry) fails
to load its library against torch 2.13 as well. kronfluence never imports torchvision, so CI installs it with
`--no-deps` (`.ci/run`), its other dependencies coming from the `peers` extra. kronfluence's wheel also
ships a top-level `tests` package that shadows this project's `tests/` (every `from tests.conftest import`
fails): `.ci/run` deletes it after the install. Measured in a fresh virtual environment with `.ci/run`'s
lines: the project's `.[test]` install 83 s, the `peers` extra and kronfluence 19 s more; no pinned version
(torch, transformers, datasets, accelerate) changes, torchvision is absent, `import tests` finds nothing in
site-packages.

bergson imports once torchvision and torchaudio are removed, but it is not adapted: its public entry points
(`bergson build` / `bergson score`, and `bergson.collect_gradients` with the `CollectorComputer` behind them)
take a causal language model and a dataset of `input_ids`: the forward-backward pass computes
`model(input_ids).logits[:, :-1]` against the next tokens (per-token cross-entropy, KL or log-odds). A
sequence or image classifier (one logit vector per row, labels a class) is outside that API; rewriting its
collector loop would no longer be bergson's method with its recommended settings. Its published
figures (LEADERBOARD.md, GPT-2 fine-tuned on WikiText, LDS at 1% subsets): MAGIC 0.931 [0.925, 0.936],
MAGIC across seeds 0.829, Shampoo 0.517, EK-FAC 0.454, TrackStar 0.10-0.27 (issue 20 quotes them); they are
not comparable to the tables below (another model, task and truth).

## How each peer is run and mapped to hf_accinf's convention

Every peer scores the same trained model: the recorded run's final weights (`RunReader.build_model`), eval
mode, the rows collated once by the run's collator, HF attention made eager (torch's SDPA has no `vmap` rule on
CPU) and the padding mask given to the model in its 4D additive form (HF's 2D-mask shortcut cannot be traced
by per-row `vmap`): the same logits. The convention is hf_accinf's: `s_j ~= L_val(theta^{-j}) - L_val(theta)`,
the predicted change of the mean evaluation loss when row `j` is removed, positive for a helpful row. All the
peers below report positive scores for helpful rows, so no sign is flipped; the scales:

| peer | what it computes | settings | mapping |
|---|---|---|---|
| kronfluence EK-FAC / K-FAC / identity | `g_q . (F + lambda)^-1 g_j`, `F` the Fisher of the mean training loss, factored | library defaults: true Fisher (labels sampled, seeded), damping 1e-8, every `nn.Linear` tracked (embeddings and LayerNorms are not supported modules), measurement the query's cross-entropy, padding masked; K-FAC with the library's damping heuristic (0.1 x mean eigenvalue): undamped, its products of two factors' tiny eigenvalues swamp the scores (Pearson r -0.59 against leave-one-out on the smoke test's ViT, 0.94 with the heuristic) | `mean_q / N` |
| dattri IF (CG) | `g_j . H^-1 g`, `H` the Hessian of the mean training loss over all rows, `g` the gradient of the mean evaluation loss (dattri's `target_func`: one inverse-Hessian product instead of one per query, the same value) | `IFAttributorCG`, 10 iterations, regularization 1e-3, every parameter | `/ N` |
| dattri TRAK, traker TRAK | TRAK on the margin `log p/(1-p)`, one checkpoint (the final model) | projection 512 capped at N/2 (the k x k kernel has rank at most N: at k >= N it is singular and its unregularised inverse is noise); traker: `BasicProjector`, normal, float32, two blocks (its one-block projector is freed after featurizing and never rebuilt: a traker bug on CPU) | `mean_q / N`; no loss scale: rank and correlation figures only |
| dattri TracIn, captum TracInCP | `sum_e eta_e g_j(theta_e) . g_q(theta_e)` over **per-epoch checkpoints made by replay**, `eta_e` the mean learning rate of the epoch | every parameter, no projection, no normalisation | `mean_q / B` (row `j` enters one step per epoch with weight `1/B`) |
| dattri DVEmb | data value embeddings accumulated over **every recorded step** (parameters rebuilt by replay), SGD form | projection 512 (as hf_accinf's DVEmb), no factorisation, per-row step `lr_t / B` | `mean_q` (already a loss change on removal) |

The trajectory peers get their checkpoints from the recorded run (`RunReader` checkpoints, rebuilt by
`Replay` between them), never only the two end points of training.
"""


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_child(work, connection) -> None:
    began = time.perf_counter()
    try:
        scores = np.asarray(work(), dtype=np.float64)
        connection.send(("ok", scores, time.perf_counter() - began, _peak_rss_mb()))
    except Exception as error:  # one refusal is a table row, not the end of the benchmark
        traceback.print_exc()
        connection.send(("error", f"{type(error).__name__}: {str(error).splitlines()[0][:140]}", 0.0, _peak_rss_mb()))
    connection.close()


def measured(work):
    """Run ``work()`` in a forked process: ``(status, scores or error, seconds, peak RSS in MB)``."""
    receive, send = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.get_context("fork").Process(target=_in_child, args=(work, send))
    process.start()
    send.close()
    result = receive.recv() if receive.poll(None) else ("error", "the process died", 0.0, 0.0)
    process.join()
    return result


def subset_effects(run: RunReader, case, masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The exact change of the mean evaluation loss with each subset (rows of ``masks``) at weight 0 and at 0.5,
    retrained by replay in one batched retraining (:class:`BatchedRetraining`, as ``--verify``)."""
    retraining = BatchedRetraining(run, case.train, case.collate_fn)
    batches = evaluation_batches(retraining.model, case.eval, case.collate_fn)
    valid = torch.cat([labels.cpu() >= 0 for _, labels in batches]).double()

    def mean_loss(parameters):
        return retraining.losses(parameters, batches) @ valid / valid.sum()

    scales = torch.cat([1.0 - masks.double(), 1.0 - 0.5 * masks.double()])
    effect = retraining.retrain(scales, mean_loss, with_base=True, progress=False).effect().numpy()
    return effect[: len(masks)], effect[len(masks):]


def from_scratch_effects(case, initial: dict[str, torch.Tensor], masks: torch.Tensor, epochs: int, batch: int
                         ) -> np.ndarray:
    """dattri's LDS truth: for each row of ``masks`` (1 = removed), the recipe retrained from its initialisation on
    the rows kept, with a batch order of its own (``TrainingArguments.seed`` = 1000 + index), and the trained
    model's mean evaluation loss."""
    from transformers import Trainer, TrainingArguments

    losses = []
    for index, removed in enumerate(masks):
        model = copy.deepcopy(case.model)
        model.load_state_dict(initial)
        kept = case.train.select(np.flatnonzero(removed.numpy() == 0).tolist())
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, num_train_epochs=epochs,
                                     use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                                     seed=1000 + index, logging_strategy="no", **bench_fidelity.RECIPES["adamw"])
            Trainer(model=model, args=args, train_dataset=kept, data_collator=case.collate_fn).train()
        model.eval()
        with torch.no_grad():
            batches = evaluation_batches(model, case.eval, case.collate_fn)
            loss = sum(float(torch.nn.functional.cross_entropy(model(**inputs).logits.double(), labels, reduction="sum"))
                       for inputs, labels in batches)
        losses.append(loss / len(case.eval))
    return np.asarray(losses)


@torch.no_grad()
def accuracy(run: RunReader, case) -> float:
    """The trained model's accuracy on the evaluation rows."""
    model = run.build_model()
    batches = evaluation_batches(model, case.eval, case.collate_fn)
    right = sum(int((model(**inputs).logits.argmax(-1) == labels).sum()) for inputs, labels in batches)
    return right / len(case.eval)


def lds(scores: np.ndarray, masks: np.ndarray, effects: np.ndarray, resamples: int = 1000,
        seed: int = 0) -> tuple[float, float, float]:
    """Objective-level LDS: Spearman correlation over subsets of the summed scores and the measured effect, with
    its 95% percentile bootstrap interval over the subsets (seeded)."""
    predicted = masks @ scores
    picks = np.random.default_rng(seed).integers(0, len(effects), size=(resamples, len(effects)))
    spread = [stats.spearmanr(predicted[pick], effects[pick]).statistic for pick in picks]
    low, high = np.nanpercentile(spread, [2.5, 97.5])
    return float(stats.spearmanr(predicted, effects).statistic), float(low), float(high)


def figures(scores: np.ndarray, rows: list[int], zero: np.ndarray, lds_truth: dict) -> dict[str, float]:
    estimate = scores[rows]
    result = {"tau": kendall_tau(estimate, zero), "r": float(stats.pearsonr(estimate, zero).statistic),
              "jaccard10": jaccard(estimate, zero, 10)}
    for fraction, (masks, effects, _) in lds_truth.items():
        result[f"lds{fraction}"] = lds(scores, masks, effects)
    return result


SCRATCH = "scratch"  # the key of dattri's from-scratch 50% LDS among the LDS columns


def peers_that_win(results: dict[str, dict[str, float]], fractions: list[float]) -> str:
    """One sentence per case: which peer beats hf_accinf's default scores on which figure (none: say so)."""
    default = results.get(next(iter(OURS)))
    if default is None:
        return "The default scores were refused on this case: no comparison."
    columns = {"tau": "Kendall tau", "r": "Pearson r", "jaccard10": "Jaccard@10", "seconds": "time"} | {
        f"lds{f}": f"LDS {100 * f:g}%" if f != SCRATCH else "LDS 50% from scratch" for f in fractions}
    wins = []
    for label, got in results.items():
        if label in OURS:
            continue
        def value(figures, key):
            return figures[key][0] if key.startswith("lds") else figures[key]

        better = [name for key, name in columns.items()
                  if (got[key] < default[key] if key == "seconds" else value(got, key) > value(default, key))]
        if better:
            wins.append(f"{label} ({', '.join(better)})")
    return ("Peers that beat the default whole-model adjoint on this case: " + "; ".join(wins) + "."
            if wins else "No peer beats the default whole-model adjoint on any figure of this case.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (named with the figures)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"among {', '.join(CASES)} (image-long: the "
                        "image case trained 12 epochs at lr 1e-3, a model that learns)")
    parser.add_argument("--rows", type=int, default=128, help="training rows (and as many evaluation rows)")
    parser.add_argument("--truth_rows", type=int, default=64, help="rows retrained out one at a time")
    parser.add_argument("--lds_fractions", default="0.05,0.1", help="fractions of the rows removed per LDS subset")
    parser.add_argument("--lds_subsets", type=int, default=24, help="random subsets per fraction")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--adamw_lr", type=float, default=3e-4, help="the HF AdamW recipe's learning rate")
    parser.add_argument("--scratch_subsets", type=int, default=24, help="dattri's setting: models trained from "
                        "scratch on random halves of the rows (0: skip)")
    parser.add_argument("--peers", default="all", help="comma-separated peer names, 'all' (the installed ones) or 'none'")
    parser.add_argument("--output", default=None, help="write the page here (docs/PEERS.md)")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    peers = available() if options.peers == "all" else [] if options.peers == "none" else options.peers.split(",")
    missing = [name for name in PEERS if name not in available()]
    fractions = [float(value) for value in options.lds_fractions.split(",")]
    command = (f"python scripts/bench_peers.py --threads {options.threads} --cases {options.cases} --rows {options.rows} "
               f"--truth_rows {options.truth_rows} --lds_fractions {options.lds_fractions} --lds_subsets "
               f"{options.lds_subsets} --scratch_subsets {options.scratch_subsets} --epochs {options.epochs} --batch "
               f"{options.batch} --adamw_lr {options.adamw_lr:g}"
               + (f" --peers {options.peers}" if options.peers != "all" else "")
               + (f" --output {options.output}" if options.output else ""))
    machine = (f"{platform.machine()} ({platform.processor() or 'cpu'}), {os.cpu_count()} cores, Python "
               f"{platform.python_version()}, torch {torch.__version__}, {options.threads} torch thread(s)")
    lines = ["# Peers side by side (generated by scripts/bench_peers.py)", "",
             f"Machine: {machine}. The seconds are indicative (a small, possibly shared machine); the "
             f"agreement figures do not depend on them. Command:", "", f"    {command}", "",
             f"Peers run: {', '.join(peers) or 'none'}; not installed here: {', '.join(missing) or 'none'}. "
             f"Each method runs in a forked process: seconds are its wall time, peak RSS the process's resident "
             f"peak (the parent's model, data and libraries included, about the same for every row).", ""]
    print("\n".join(lines), flush=True)
    tables = []
    for case_name in options.cases.split(","):
        builder, epochs, learning_rate = CASES[case_name]
        epochs, learning_rate = epochs or options.epochs, learning_rate or options.adamw_lr
        bench_fidelity.RECIPES["adamw"]["learning_rate"] = learning_rate
        case = getattr(bench_fidelity, builder)(options.rows, seed=0)
        initial = copy.deepcopy(case.model.state_dict())  # the recipe's initialisation, before the run trains it
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            train_seconds = bench_fidelity.train(case, "adamw", run_dir, epochs, options.batch)
            run = RunReader(run_dir)
            generator = torch.Generator().manual_seed(0)
            rows = torch.randperm(options.rows, generator=generator)[: options.truth_rows].tolist()
            zero, half, truth_seconds, eval_loss = bench_fidelity.truth(case, run, rows)
            lds_truth = {}
            began = time.perf_counter()
            for fraction in fractions:
                size = max(1, round(fraction * options.rows))
                masks = torch.zeros(options.lds_subsets, options.rows)
                for index in range(options.lds_subsets):
                    masks[index, torch.randperm(options.rows, generator=generator)[:size]] = 1.0
                effects, effects_half = subset_effects(run, case, masks)
                lds_truth[fraction] = (masks.numpy(), effects, effects_half)
            lds_seconds = time.perf_counter() - began
            columns = list(fractions)
            scratch_note = ""
            if options.scratch_subsets:
                began = time.perf_counter()
                masks = torch.zeros(options.scratch_subsets, options.rows)
                for index in range(options.scratch_subsets):
                    masks[index, torch.randperm(options.rows, generator=generator)[: options.rows // 2]] = 1.0
                lds_truth[SCRATCH] = (masks.numpy(), from_scratch_effects(case, initial, masks, epochs, options.batch),
                                      None)
                columns.append(SCRATCH)
                scratch_note = (f" dattri's setting: {options.scratch_subsets} models trained from scratch on random "
                                f"halves ({time.perf_counter() - began:.1f} s; no ceiling: a new batch order each).")
            ceiling = {"tau": kendall_tau(2 * half, zero), "r": float(stats.pearsonr(2 * half, zero).statistic)}
            lds_ceiling = {f: float(stats.spearmanr(2 * h, e).statistic) for f, (_, e, h) in lds_truth.items()
                           if f != SCRATCH}
            losses = run.trajectory().loss
            lds_names = " | ".join(f"LDS {100 * f:g}% ({max(1, round(f * options.rows))} rows)" if f != SCRATCH else
                                   f"LDS 50% from scratch ({options.rows // 2} rows, dattri's setting)" for f in columns)
            table = [f"## {case.name} ({case_name}), HF AdamW recipe (lr {learning_rate:g}, warm-up, linear decay, "
                     "clipping 1.0), trained whole", "",
                     f"{options.rows} training and {options.rows} evaluation rows, {epochs} epochs, batch "
                     f"{options.batch}. Training loss {float(losses[0]):.3f} (first step) -> {float(losses[-1]):.3f} "
                     f"(last step), mean evaluation loss {eval_loss:.3f} (chance {np.log(case.model.config.num_labels):.3f}), "
                     f"evaluation accuracy {accuracy(run, case):.2f}. "
                     f"Training {train_seconds:.1f} s. Truth by replay: {len(rows)} rows left out one at a time "
                     f"({truth_seconds:.1f} s; linearity ceiling tau {ceiling['tau']:.3f}, r {ceiling['r']:.3f}) and "
                     f"{options.lds_subsets} random subsets per fraction ({lds_seconds:.1f} s; LDS ceiling, truth(S at 0) "
                     f"against 2 x truth(S at 0.5): " + ", ".join(f"{100 * f:g}% {c:.3f}" for f, c in lds_ceiling.items())
                     + ")." + scratch_note, "",
                     f"| method | Kendall tau | Pearson r | Jaccard@10 | {lds_names} | seconds | peak RSS (MB) |",
                     "|---|---|---|---|" + "---|" * len(columns) + "---|---|"]
            print("\n".join(table), flush=True)

            results = {}

            def add(label, result):
                status, value, seconds, peak = result
                if status != "ok":
                    table.append(f"| {label} | refused: {value} |" + " |" * (4 + len(columns)))
                else:
                    got = results[label] = figures(value, rows, zero, lds_truth) | {"seconds": seconds}
                    cells = " | ".join("{:.3f} [{:.2f}, {:.2f}]".format(*got[f"lds{f}"]) for f in columns)
                    table.append(f"| {label} | {got['tau']:.3f} | {got['r']:.3f} | {got['jaccard10']:.2f} | {cells} | "
                                 f"{seconds:.1f} | {peak:.0f} |")
                print(table[-1], flush=True)

            for label, settings in OURS.items():
                arguments = ScoreArguments(run_dir=str(run_dir), trust_probes=0, output_dir=str(Path(tmp) / "scores"),
                                           overwrite=True, **settings)
                add(label, measured(lambda: score_run(arguments, case.train, case.eval, collate_fn=case.collate_fn,
                                                      progress=False).scores.double().numpy()))
            if peers:
                problem = peer_problem(run_dir, case.train, case.eval, case.collate_fn)
                for name in peers:
                    add(PEERS[name].display, measured(lambda: score_peer(name, problem).numpy()))
            tables += table + ["", peers_that_win(results, columns), ""]
            if options.output:  # after every case: a long run keeps what it has measured
                Path(options.output).write_text("\n".join(lines + tables + [STATIC]))
    if options.output:
        Path(options.output).write_text("\n".join(lines + tables + [STATIC]))


if __name__ == "__main__":
    main()
