"""Markdown tables and PNG curves of the paper reproduction (docs/RESULTS.md), from result records.

A record is :meth:`ConfigurationResult.to_dict`; aggregation is over seeds (mean +- std).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from ...methods.registry import METHODS
from .experiments import ESTIMATORS
from .tables import PAPER_DATASET, TABLE1

METRICS = ("rmse", "kendall_tau", "jaccard@70", "jaccard@50", "jaccard@30", "jaccard@10")
HEADERS = ("RMSE", "Kendall", "J@70", "J@50", "J@30", "J@10", "param err")
METHOD_NAMES = {name: METHODS[name].display for name in ESTIMATORS}
DATASET_NAMES = {"adult": "Adult", "digits": "digits (MNIST stand-in)", "text": "RT text (20News stand-in)"}
LOWER_IS_BETTER = {"rmse", "param err"}
# docs/RESULTS.md holds section 7 (scripts/reproduce_section7.py) between these markers; each script keeps the
# other's part when it rewrites its own.
SECTION_7_BEGIN, SECTION_7_END = "<!-- section7:begin -->", "<!-- section7:end -->"


def section7_block(text: str) -> str:
    """The section 7 block of a RESULTS.md text, markers included ("" if it has none)."""
    if SECTION_7_BEGIN not in text or SECTION_7_END not in text:
        return ""
    return SECTION_7_BEGIN + text.split(SECTION_7_BEGIN, 1)[1].split(SECTION_7_END, 1)[0] + SECTION_7_END


def splice_section7(text: str, block: str) -> str:
    """``text`` with its section 7 block replaced by ``block`` (markers included), or ``block`` appended."""
    block = block.rstrip("\n")
    old = section7_block(text)
    if old:
        return text.replace(old, block, 1)
    return (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"


def cell_key(record: dict) -> tuple[str, str, str, float]:
    config = record["config"]
    return config["model"], config["dataset"], config["noise"]["kind"], config["noise"]["level"]


def group(records: list[dict]) -> dict[tuple, list[dict]]:
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        cells[cell_key(record)].append(record)
    return cells


def series(records: list[dict], method: str, kind: str, metric: str) -> np.ndarray:
    if metric == "param err":
        return np.array([r["shift_error"][method] for r in records])
    return np.array([r["metrics"][method][kind][metric] for r in records])


def fmt(values: np.ndarray, metric: str) -> str:
    mean, std = float(np.mean(values)), float(np.std(values))
    if metric == "rmse":
        return f"{mean:.2e} ± {std:.1e}"
    return f"{mean:.4f} ± {std:.4f}"


def noise_label(kind: str, level: float) -> str:
    return {"clean": "clean", "feature": f"feature noise {level:g}", "label": f"label flip {level:g}"}[kind]


def regime_table(records: list[dict], model: str, noise_kind: str, kinds=("linear", "evaluated")) -> str:
    """One part of Table 1/2: every dataset of one noise kind, both estimators, both score kinds, paper rows."""
    lines = ["| Dataset | Setting | Method | Score | " + " | ".join(HEADERS) + " |",
             "|" + "---|" * (4 + len(HEADERS))]
    cells = group(records)
    for (cell_model, dataset, kind_of_noise, level), cell in sorted(cells.items()):
        if cell_model != model or kind_of_noise != noise_kind:
            continue
        setting = noise_label(kind_of_noise, level)
        for kind in kinds:
            for method in METHOD_NAMES:
                row = [fmt(series(cell, method, kind, m), m) for m in METRICS]
                row.append(fmt(series(cell, method, kind, "param err"), "param err"))
                lines.append(f"| {DATASET_NAMES[dataset]} | {setting} | {METHOD_NAMES[method]} | {kind} | "
                             + " | ".join(row) + " |")
        if model == "dnn":
            for index, paper in enumerate(TABLE1.get((dataset, noise_kind), [])):
                level_name = f"paper {PAPER_DATASET[dataset]}" + (f" (level {index + 1})" if noise_kind != "clean" else "")
                for method, values in paper.items():
                    row = ["lost"] + [f"{v:.4f}" for v in values] + ["—"]
                    lines.append(f"| *{level_name}* | *(paper)* | *{METHOD_NAMES[method]}* | *linear* | "
                                 + " | ".join(row) + " |")
        lines.append(f"| *{len(cell)} seed{'s' if len(cell) > 1 else ''}* | | | | " + " | " * (len(HEADERS) - 1) + " |")
    return "\n".join(lines)


def win_counts(records: list[dict], model: str) -> dict[str, dict[str, tuple[int, int, int]]]:
    """Per score kind and metric, over (dataset, noise) cells: how often ACC-SGD-IE's seed mean beats, ties
    (equal to 1e-9 relative) or loses to SGD-IE's."""
    counts: dict[str, dict[str, tuple[int, int, int]]] = {}
    cells = {key: cell for key, cell in group(records).items() if key[0] == model}
    for kind in ("linear", "evaluated"):
        counts[kind] = {}
        for metric in METRICS + ("param err",):
            wins = ties = 0
            for cell in cells.values():
                acc = series(cell, "acc-sgd-ie", kind, metric).mean()
                sgd = series(cell, "sgd-ie", kind, metric).mean()
                if abs(acc - sgd) <= 1e-9 * max(abs(acc), abs(sgd)):
                    ties += 1
                else:
                    wins += int(acc < sgd if metric in LOWER_IS_BETTER else acc > sgd)
            counts[kind][metric] = (wins, ties, len(cells) - wins - ties)
    return counts


def wins_table(records: list[dict], models: dict[str, str]) -> str:
    lines = ["| Regime | Score | " + " | ".join(HEADERS) + " |", "|" + "---|" * (2 + len(HEADERS))]
    for model, name in models.items():
        if not any(cell_key(r)[0] == model for r in records):
            continue
        for kind, counts in win_counts(records, model).items():
            metric_names = METRICS + ("param err",)
            lines.append(f"| {name} | {kind} | " + " | ".join("–".join(map(str, counts[m])) for m in metric_names) + " |")
    return "\n".join(lines)


def mean_over(records: list[dict], model: str, method: str, kind: str, metric: str) -> float:
    values = [series([r], method, kind, metric)[0] for r in records if cell_key(r)[0] == model]
    return float(np.mean(values)) if values else float("nan")


def plot_curves(curves: dict[str, dict[str, list[list[float]]]], epochs: list[int], path: Path, title: str) -> None:
    """Mean over seeds of RMSE and Jaccard@10 (linear and evaluated scores) and parameter error vs epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("linear/rmse", "RMSE (linear score)"), ("linear/jaccard@10", "Jaccard@10 (linear score)"),
              ("evaluated/rmse", "RMSE (evaluated score)"), ("evaluated/jaccard@10", "Jaccard@10 (evaluated score)"),
              ("shift_error", "relative parameter error")]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for axis, (suffix, label) in zip(axes, panels):
        for method, color in (("sgd-ie", "tab:blue"), ("acc-sgd-ie", "tab:orange")):
            values = np.array(curves[f"{method}/{suffix}"])
            mean, std = values.mean(0), values.std(0)
            axis.plot(epochs, mean, marker="o", ms=3, color=color, label=METHOD_NAMES[method])
            axis.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2)
        axis.set_xlabel("epoch")
        axis.set_title(label, fontsize=10)
        if suffix.endswith("rmse") or suffix == "shift_error":
            axis.set_yscale("log")
    axes[0].legend()
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def curve_table(curves: dict[str, list[list[float]]], epochs: list[int], picks: list[int]) -> str:
    keys = [("linear/rmse", "RMSE lin"), ("linear/jaccard@10", "J@10 lin"), ("evaluated/rmse", "RMSE eval"),
            ("evaluated/jaccard@10", "J@10 eval"), ("shift_error", "param err")]
    header = "| Epoch | " + " | ".join(f"{label} {METHOD_NAMES[m]}" for _, label in keys for m in METHOD_NAMES) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(keys))]
    for pick in picks:
        index = epochs.index(pick)
        row = []
        for key, _ in keys:
            for method in METHOD_NAMES:
                value = float(np.mean(np.array(curves[f"{method}/{key}"])[:, index]))
                row.append(f"{value:.2e}" if "rmse" in key or key == "shift_error" else f"{value:.3f}")
        lines.append(f"| {pick} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def cleansing_table(results: list[dict], removals: list[int]) -> str:
    """Test misclassification rate (and share of flipped labels among removed rows) per ranking and k."""
    names = list(results[0]["test_error"])
    lines = ["| Ranking | " + " | ".join(f"k={k}" for k in removals) + " |", "|" + "---|" * (1 + len(removals))]
    for name in names:
        errors = np.array([r["test_error"][name] for r in results])
        found = np.array([r["corrupted_found"][name] for r in results])
        cells = [f"{errors[:, i].mean():.4f} ± {errors[:, i].std():.4f} ({found[:, i].mean():.0%})" for i in range(len(removals))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
