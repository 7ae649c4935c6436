"""The ACC-SGD-IE paper's section 7 (Tables 3 and 4: TracIn, DVEmb, ACC-DVEmb; Adam-IE, ACC-Adam-IE) against
leave-one-out retraining, written as the section "Section 7 — the broader family" of docs/RESULTS.md.

    nice -n 10 python scripts/reproduce_section7.py                 # full run: 5 seeds, writes docs/
    python scripts/reproduce_section7.py --smoke                    # tiny version, seconds (the tests run it)
    python scripts/reproduce_section7.py --from-json docs/section7.json   # re-render without rerunning
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from hf_accinf.evaluation import report
from hf_accinf.evaluation.experiments import ExperimentConfig
from hf_accinf.evaluation.family import METRICS, AdamRecipe, SGDSetting, adam_seed, sgd_seed, summarize
from hf_accinf.evaluation.paper import (SECTION_7, TABLE3, TABLE3_METRICS, TABLE3_TRACIN_32_SURVIVORS, TABLE4,
                                        TABLE4_METRICS)

BEGIN, END = report.SECTION_7_BEGIN, report.SECTION_7_END
HEADERS = ("Kendall", "J@70", "J@50", "J@30", "J@10")
PAPER_NAMES = {"tracin": "TracIn", "dvemb": "DVEmb", "acc-dvemb": "ACC-DVEmb", "adam-ie": "Adam-IE",
               "acc-adam-ie": "ACC-Adam-IE"}


@dataclass
class Section7Settings:
    """What the run covers: Table 3 settings (the first is the main one) and Table 4 recipes (the first is
    the main one); :meth:`smoke` is a tiny version."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    sgd: tuple[SGDSetting, ...] = (
        SGDSetting(sweep_dims=(16, 32, 64, 256, 512)),
        SGDSetting(name="constant", schedule="constant"),
    )
    adam: tuple[AdamRecipe, ...] = (
        AdamRecipe(),
        AdamRecipe(name="relu-lr0.1", lr=0.1),
        AdamRecipe(name="tanh", activation="tanh"),
    )

    @classmethod
    def smoke(cls) -> "Section7Settings":
        tiny = ExperimentConfig("digits", "dnn", n_train=60, n_val=60, batch_size=30)
        return cls(seeds=(0,), sgd=(SGDSetting(eval_epochs=(1, 2), sweep_dims=(16,), experiment=tiny),),
                   adam=(AdamRecipe(epochs=2, experiment=tiny),))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_all(settings: Section7Settings) -> dict:
    rows, runs, seconds = [], [], {}
    for table, configs, one_seed in (("3", settings.sgd, sgd_seed), ("4", settings.adam, adam_seed)):
        for config in configs:
            for seed in settings.seeds:
                began = time.perf_counter()
                seed_rows, seed_runs = one_seed(config, seed)
                rows += [{"table": table, **row} for row in seed_rows]
                runs += [{"table": table, **run} for run in seed_runs]
                seconds[f"{table}/{config.name}/{seed}"] = time.perf_counter() - began
                log(f"table {table} {config.name} seed {seed}: {seconds[f'{table}/{config.name}/{seed}']:.1f}s")
    return {"rows": rows, "runs": runs, "seconds": seconds}


# ---------------------------------------------------------------------------------------------------------- render

def cell(entry: dict, metric: str) -> str:
    return f"{entry[metric]:.4f} ± {entry[metric + '_std']:.3f}"


def paper_cells(values: tuple[float | None, ...] | None, metrics: tuple[str, ...]) -> list[str]:
    known = dict(zip(metrics, values)) if values else {}
    return [f"*{known[m]:.4f}*" if known.get(m) is not None else "—" for m in METRICS]


ROW_KEYS = ("setting", "epoch", "estimator", "method", "projection_dim", "removal", "score")


def summary_of(raw: dict, table: str) -> tuple[list[dict], list[dict]]:
    rows = [r for r in raw["rows"] if r["table"] == table]
    runs = [r for r in raw["runs"] if r["table"] == table]
    return (summarize(rows, ROW_KEYS, METRICS),
            summarize(runs, ("setting", "epoch"), ("val_accuracy", "linearity_ceiling", "clipped_steps")))


def acc_changes(raw: dict) -> list[dict]:
    """Median (over rows) relative change of the embeddings by ACC against the classical twin, mean over seeds."""
    rows = [r for r in raw["rows"] if r["acc_change"] is not None and r["score"] == "linear"]
    return summarize(rows, ("table",) + ROW_KEYS, ("acc_change",))


def acc_table(raw: dict) -> str:
    """Table 3 and Table 4 settings as rows, the ACC estimators of the main tables as columns."""
    changes = acc_changes(raw)
    lines = []
    for table in ("3", "4"):
        main_dims = {None, *(d for s in raw["settings"]["sgd"] for d in s["projection_dims"])}
        entries = [e for e in changes if e["table"] == table and e["projection_dim"] in main_dims]
        columns = list(dict.fromkeys(e["estimator"] for e in entries))
        cells: dict[tuple, dict[str, str]] = {}
        for e in entries:
            cells.setdefault((e["setting"], e["epoch"]), {})[e["estimator"]] = \
                f"{e['acc_change']:.1e} ± {e['acc_change_std']:.0e}"
        lines += [f"| Table {table}: setting | Epoch | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
        lines += [f"| `{setting}` | {epoch} | " + " | ".join(row.get(c, "") for c in columns) + " |"
                  for (setting, epoch), row in cells.items()]
        lines.append("")
    return "\n".join(lines)


def runs_line(entry: dict) -> str:
    return (f"validation accuracy {cell(entry, 'val_accuracy')}, linearity ceiling (Kendall tau of truth(0) "
            f"against 2 truth(0.5)) {cell(entry, 'linearity_ceiling')}")


def table3(raw: dict, setting: dict) -> str:
    summary, runs = summary_of(raw, "3")
    name = setting["name"]
    lines = ["| Epoch | Method | " + " | ".join(HEADERS) + " |", "|---|---|" + "---|" * len(HEADERS)]
    for epoch in setting["eval_epochs"]:
        entries = [e for e in summary if e["setting"] == name and e["epoch"] == epoch
                   and e["projection_dim"] in (None, *setting["projection_dims"])]
        paper = TABLE3.get(epoch, {})
        shown_epoch = str(epoch)
        for entry in entries:
            lines.append(f"| {shown_epoch} | {entry['estimator']} | " + " | ".join(cell(entry, m) for m in METRICS) + " |")
            shown_epoch = ""
            last_of_family = entry["method"] == "tracin" or (
                entry["method"] == "acc-dvemb" and entry["projection_dim"] == setting["projection_dims"][-1])
            if paper and last_of_family:
                for method in (("tracin",) if entry["method"] == "tracin" else ("dvemb", "acc-dvemb")):
                    if method == "tracin" and paper.get("tracin") is None:
                        survivors = ", ".join(f"{v:.4f}" for v in TABLE3_TRACIN_32_SURVIVORS)
                        lines.append(f"| | *paper {PAPER_NAMES[method]}* | *four cells survive, column lost: "
                                     f"{survivors}* | | | | |")
                    else:
                        lines.append(f"| | *paper {PAPER_NAMES[method]}* | "
                                     + " | ".join(paper_cells(paper[method], TABLE3_METRICS)) + " |")
    run_lines = [f"- epoch {e['epoch']}: {runs_line(e)}" for e in runs if e["setting"] == name]
    return "\n".join(lines) + "\n\n" + "\n".join(run_lines) + "\n"


def sweep_table(raw: dict, setting: dict) -> str:
    summary, _ = summary_of(raw, "3")
    last = max(setting["eval_epochs"])
    dims = sorted({e["projection_dim"] for e in summary if e["setting"] == setting["name"] and e["epoch"] == last
                   and e["projection_dim"] is not None}, key=lambda k: (k == 0, k))
    lines = ["| k | DVEmb Kendall | ACC-DVEmb Kendall | DVEmb J@10 | ACC-DVEmb J@10 |", "|---|---|---|---|---|"]
    for dim in dims:
        pick = {e["method"]: e for e in summary if e["setting"] == setting["name"] and e["epoch"] == last
                and e["projection_dim"] == dim}
        shown = "no projection" if dim == 0 else str(dim)
        lines.append(f"| {shown} | {cell(pick['dvemb'], 'kendall_tau')} | {cell(pick['acc-dvemb'], 'kendall_tau')} | "
                     f"{cell(pick['dvemb'], 'jaccard@10')} | {cell(pick['acc-dvemb'], 'jaccard@10')} |")
    reference = [e for e in summary if e["setting"] == setting["name"] and e["epoch"] == last and e["method"] == "sgd-ie"]
    if reference:
        lines.append(f"| (SGD-IE, exact Hessian) | {cell(reference[0], 'kendall_tau')} | | "
                     f"{cell(reference[0], 'jaccard@10')} | |")
    return "\n".join(lines) + "\n"


def table4(raw: dict, recipe: dict) -> str:
    summary, runs = summary_of(raw, "4")
    name = recipe["name"]
    lines = ["| Method | Score | " + " | ".join(HEADERS) + " |", "|---|---|" + "---|" * len(HEADERS)]
    for score in ("cosine", "linear"):
        for entry in (e for e in summary if e["setting"] == name and e["score"] == score):
            lines.append(f"| {entry['estimator']} | {score} | " + " | ".join(cell(entry, m) for m in METRICS) + " |")
        if score == "cosine":
            for method, values in TABLE4.items():
                lines.append(f"| *paper {PAPER_NAMES[method]}* | *cosine* | "
                             + " | ".join(paper_cells(values, TABLE4_METRICS)) + " |")
    run_lines = [f"- {runs_line(e)}; share of clipped steps {e['clipped_steps']:.2f}" for e in runs if e["setting"] == name]
    return "\n".join(lines) + "\n\n" + "\n".join(run_lines) + "\n"


def recipe_text(recipe: dict) -> str:
    activation = "ReLU" if recipe["activation"] == "relu" else recipe["activation"]
    return (f"`{recipe['name']}`: {activation} MLP, AdamW peak lr {recipe['lr']:g}, HF linear schedule with warm-up "
            f"ratio {recipe['warmup_ratio']:g}, weight decay {recipe['weight_decay']:g} (biases exempt), clipping "
            f"{recipe['max_grad_norm']:g}, betas (0.9, 0.999), eps 1e-8, {recipe['epochs']} epochs")


def tables_markdown(raw: dict) -> str:
    settings = raw["settings"]
    parts = []
    for index, setting in enumerate(settings["sgd"]):
        title = ("main: the harness's `lr_t = 0.1 / sqrt(t + 1)`" if setting["schedule"] == "inverse-sqrt"
                 else "ablation: constant lr 0.1")
        parts.append(f"### Table 3 — SGD, {title} ({len(settings['seeds'])} seeds)\n\n{table3(raw, setting)}")
        if setting["sweep_dims"]:
            parts.append(f"### What the projection costs (epoch {max(setting['eval_epochs'])}, setting "
                         f"`{setting['name']}`)\n\n{sweep_table(raw, setting)}")
    for recipe in settings["adam"]:
        parts.append(f"### Table 4 — AdamW, {recipe_text(recipe)} ({len(settings['seeds'])} seeds)\n\n{table4(raw, recipe)}")
    parts.append("### How far ACC moves the embeddings\n\nFor each row, `||e_ACC - e||/ ||e||` against the classical "
                 "twin's embedding `e` (same run, projection and removal); median over rows, mean ± std over seeds.\n\n"
                 + acc_table(raw))
    return "\n".join(parts)


def section_markdown(raw: dict, discussion: str = "") -> str:
    settings = raw["settings"]
    main = settings["sgd"][0]
    experiment = main["experiment"]
    header = f"""## Section 7 — the broader family

Generated by `{raw['command']}` in {raw['total_seconds'] / 60:.1f} minutes on {raw['machine']} with
{raw['threads']} torch thread(s) (torch {raw['torch']}); raw numbers in `section7.json`. Do not edit by hand.

{SECTION_7}

**Setup.** digits (MNIST stand-in, classes >= 5 against < 5), {experiment['n_train']} training and
{experiment['n_val']} validation rows per seed, standardized; the harness's `d-8-8-1` MLP, one logit read as
binary cross-entropy, batch {experiment['batch_size']}, float64, seeds {', '.join(map(str, settings['seeds']))}.
Table 3: plain SGD from lr 0.1 with the harness's DNN convention `lr_t = 0.1 / sqrt(t + 1)` (t the step, as
DESIGN.md section 7 reads the authors' code), trained once for {max(main['eval_epochs'])} epochs per seed and
stopped after {', '.join(map(str, main['eval_epochs']))} epochs (the first epochs of the long run: same batches
and rates); every training row retrained out at each. Scores are linear (`grad L_val(theta_T) . embedding`).
DVEmb's projection is Gaussian, seeded by the run's seed; "no projection" keeps all parameters. Table 4: the
same data and model trained with AdamW, recipes below; Adam-IE and ACC-Adam-IE with exact and first-order
removal (DESIGN.md section 4), LESS's cosine score (the paper's Table 4) and the linear score. Metrics
(DESIGN.md section 7): Kendall tau and two-tailed Jaccard@k against the leave-one-out loss changes; cells are
mean ± std over seeds. Italic rows: the paper's numbers (MNIST; its data, not ours). Each table also gives
the validation accuracy of the model and the **linearity ceiling**: every row also retrained at weight 0.5,
and Kendall tau of truth(0) against 2 truth(0.5), how far a first-order estimate can agree with this truth.
"""
    return f"{BEGIN}\n{header}\n{tables_markdown(raw)}\n{discussion}{END}\n"


def discussion_markdown(raw: dict) -> str:
    return ""


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny version: 60 rows, epochs 1-2, one seed")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2 3 4)")
    parser.add_argument("--output", help="directory for section7.json and RESULTS.md (default docs/; --smoke: a "
                                         "temporary directory)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is the most robust on a shared machine)")
    parser.add_argument("--from-json", help="re-render from a section7.json of an earlier run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    machine = f"{platform.node()} ({platform.machine()}, {platform.system()} {platform.release()})"
    log(f"{args.threads} torch thread(s) on {machine}")
    settings = Section7Settings.smoke() if args.smoke else Section7Settings()
    if args.seeds:
        settings = replace(settings, seeds=tuple(args.seeds))
    output = Path(args.output or (tempfile.mkdtemp(prefix="section7-smoke-") if args.smoke else "docs"))
    output.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        raw = json.loads(Path(args.from_json).read_text())
    else:
        began = time.perf_counter()
        raw = run_all(settings)
        raw.update(settings=asdict(settings), total_seconds=time.perf_counter() - began, machine=machine,
                   threads=args.threads, torch=torch.__version__,
                   command="python scripts/reproduce_section7.py" + (" --smoke" if args.smoke else "")
                   + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds else ""))
        (output / "section7.json").write_text(json.dumps(raw, indent=1))
    print(tables_markdown(raw))
    results = output / "RESULTS.md"
    discussion = "" if args.smoke else discussion_markdown(raw)
    results.write_text(report.splice_section7(results.read_text() if results.exists() else "",
                                              section_markdown(raw, discussion)))
    log(f"wrote {output / 'section7.json'} and the section 7 of {results} ({raw['total_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
