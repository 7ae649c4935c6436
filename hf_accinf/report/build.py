"""The report of a scored dataset: ``report.md``, ``report.html`` and the PNGs they show.

Sections: the score columns (provenance, summary statistics) and their distributions; the most helpful
and most harmful rows of each column (text snippets or image thumbnails, with labels); agreement
between columns (Kendall's tau, scatter); the agreement of each column with the rows its scoring run
retrained out (``--verify``: a table and an estimate-against-truth scatter) and over subsets retrained out
(``--verify_subsets``: the LDS table); the trust figures the
scoring run recorded (a table); and, given ground truth (e.g. leave-one-out retraining), estimate
against truth (DESIGN.md section 7's metrics). The report is written as a whole (:mod:`hf_accinf.io`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset

from ..data.columns import SIGN_CONVENTION, read_provenance, score_columns
from ..data.hub import (LDS_EXPLANATION, LDS_HEADER, VERIFY_HEADER, describe_evaluation, lds_rows, text, trust_rows,
                        verify_cells)
from ..errors import AccInfError
from ..io import refuse_foreign, write_directory
from . import plots
from .document import Block, Heading, Image, Paragraph, Table, to_html, to_markdown

REPORT_FILE, HTML_FILE = "report.md", "report.html"
LABEL_COLUMNS = ("labels", "label", "label_ids")
IMAGE_COLUMNS = ("pixel_values", "image", "img")
TEXT_COLUMNS = ("text", "sentence", "review", "content", "document", "question")


@dataclass
class ReportArguments:
    output_dir: str = field(default=None, metadata={"help": "Where to write report.md, report.html and the PNGs."})
    truth: str | None = field(default=None, metadata={"help": "Ground truth per row, PATH[:NAME] as `hf-accinf evaluate` "
                                                               "reads it (safetensors, saved dataset, .npy, .pt, .csv)."})
    top_k: int = field(default=8, metadata={"help": "How many most helpful and most harmful rows to show per column."})
    title: str = field(default="Training-data influence report", metadata={"help": "Title of the report."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a report written earlier into --output_dir."})

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise AccInfError("Pass --output_dir: where to write the report.")
        if self.top_k < 1:
            raise AccInfError(f"--top_k {self.top_k} must be at least 1.")


@dataclass
class Report:
    markdown: Path
    html: Path
    images: list[Path]


def build_report(dataset: Dataset, args: ReportArguments) -> Report:
    """Write the report of ``dataset``'s score columns into ``args.output_dir`` (as a whole, atomically)."""
    columns = {name: np.asarray(dataset.with_format("numpy")[name], dtype=np.float64) for name in score_columns(dataset)}
    if not columns:
        raise AccInfError(f"No score columns in the dataset (columns {dataset.column_names}): attach scores with --scores_dir.")
    truth = _truth(args.truth, len(dataset))
    plots.pyplot()  # matplotlib present, before any work
    target = refuse_foreign(args.output_dir, args.overwrite, lambda directory: (directory / REPORT_FILE).is_file())
    images: list[str] = []

    def fill(staging: Path) -> None:
        blocks = _blocks(dataset, columns, truth, args, staging)
        (staging / REPORT_FILE).write_text(to_markdown(blocks))
        (staging / HTML_FILE).write_text(to_html(blocks, args.title))
        images.extend(sorted(p.name for p in staging.glob("*.png")))

    write_directory(target, fill)
    return Report(target / REPORT_FILE, target / HTML_FILE, [target / name for name in images])


def _truth(source: str | None, num_rows: int) -> np.ndarray | None:
    if source is None:
        return None
    from ..evaluation.compare import load_values

    values = load_values(source)
    if len(values) != num_rows or not np.isfinite(values).all():
        raise AccInfError(f"--truth {source} holds {len(values)} values (finite: {bool(np.isfinite(values).all())}) "
                          f"for {num_rows} rows: pass one finite value per training row, in row order.")
    return values


def _blocks(dataset: Dataset, columns: dict[str, np.ndarray], truth, args: ReportArguments, out: Path) -> list[Block]:
    provenance = read_provenance(dataset)
    known = provenance["columns"]
    blocks: list[Block] = [Heading(args.title, 1), Paragraph(f"{len(dataset)} training rows; score columns "
                           f"{', '.join(f'`{c}`' for c in columns)}. Sign convention: {SIGN_CONVENTION}")]
    blocks += [Heading("Score columns"), Table(
        ["column", "method", "form", "scope", "evaluation set", "run manifest", "mean", "std", "min", "max",
         "harmful rows", "helpful rows"],
        [[f"`{name}`", known.get(name, {}).get("method"), known.get(name, {}).get("form"), text(known.get(name, {}).get("scope")),
          describe_evaluation(known.get(name, {}).get("evaluation")),
          ((known.get(name, {}).get("run") or {}).get("manifest_sha256") or "")[:12], float(v.mean()), float(v.std()),
          float(v.min()), float(v.max()), int((v < 0).sum()), int((v > 0).sum())] for name, v in columns.items()])]
    plots.distributions(columns, out / "distributions.png")
    blocks.append(Image("distributions.png", "Distribution of each score column (red: harmful, blue: helpful)."))
    blocks += _examples(dataset, columns, args.top_k, out)
    if len(columns) > 1:
        blocks += _agreement(columns, out)
    blocks += _verify(known, columns, out)
    blocks += _lds(known, columns)
    blocks += _trust(known, columns)
    if truth is not None:
        blocks += _versus_truth(columns, truth, args.truth, out)
    if "prune" in provenance:
        prune = provenance["prune"]
        blocks += [Heading("Pruning"), Paragraph(f"This dataset was pruned: {prune['num_dropped']} of "
                                                 f"{prune['num_rows_before']} rows dropped ({prune['rule']}).")]
    return blocks


def _verify(known: dict, columns: dict[str, np.ndarray], out: Path) -> list[Block]:
    checks = {name: known[name]["verify"] for name in columns if (known.get(name) or {}).get("verify")}
    if not checks:
        return []
    blocks: list[Block] = [
        Heading("Agreement with rows retrained out (--verify)"),
        Paragraph("Each scoring run retrained k random rows out by replay (their loss weight 0 at every occurrence, "
                  "everything else as recorded) and compared its scores of these rows with the exact change of the "
                  "evaluation loss. The linearity ceiling (truth at weight 0 against twice the truth at weight 0.5) "
                  "bounds the agreement any first-order estimate can reach on this run."),
        Table(["column"] + VERIFY_HEADER, [[f"`{name}`"] + verify_cells(check) for name, check in checks.items()])]
    plotted = {name: check for name, check in checks.items() if check.get("estimate") and check.get("truth")}
    if plotted:
        plots.verify(plotted, out / "verify.png")
        blocks.append(Image("verify.png", "Estimated score of each retrained row against the exact change of the "
                                          "evaluation loss without it (truth at weight 0); the diagonal is agreement."))
    return blocks


def _lds(known: dict, columns: dict[str, np.ndarray]) -> list[Block]:
    checks = {name: known[name]["lds"] for name in columns if (known.get(name) or {}).get("lds")}
    if not checks:
        return []
    return [Heading("LDS over subsets retrained out (--verify_subsets)"), Paragraph(LDS_EXPLANATION),
            Table(["column"] + LDS_HEADER, [[f"`{name}`"] + row for name, check in checks.items()
                                            for row in lds_rows(check)])]


def _trust(known: dict, columns: dict[str, np.ndarray]) -> list[Block]:
    figures = {name: dict(trust_rows(known[name]["trust"])) for name in columns if (known.get(name) or {}).get("trust")}
    if not figures:
        return []
    names = list(dict.fromkeys(label for rows in figures.values() for label in rows))
    return [Heading("Trust figures"), Paragraph("Figures the scoring run recorded about its own reliability."),
            Table(["figure"] + [f"`{c}`" for c in figures], [[n] + [figures[c].get(n) for c in figures] for n in names])]


def _agreement(columns: dict[str, np.ndarray], out: Path) -> list[Block]:
    from scipy.stats import kendalltau

    names = list(columns)
    taus = {(a, b): float(kendalltau(columns[a], columns[b]).statistic) for i, a in enumerate(names) for b in names[i + 1:]}
    plots.agreement(columns, taus, out / "agreement.png")
    return [Heading("Agreement between columns"),
            Table(["column", "column", "Kendall tau"], [[f"`{a}`", f"`{b}`", tau] for (a, b), tau in taus.items()]),
            Image("agreement.png", "Each pair of score columns, row by row.")]


def _versus_truth(columns: dict[str, np.ndarray], truth: np.ndarray, source: str, out: Path) -> list[Block]:
    from ..evaluation.compare import evaluate_scores

    metrics = {name: evaluate_scores(values, truth) for name, values in columns.items()}
    keys = list(next(iter(metrics.values())))
    plots.versus_truth(columns, truth, metrics, out / "truth.png")
    return [Heading("Estimate against ground truth"), Paragraph(f"Ground truth from `{source}`."),
            Table(["column"] + keys, [[f"`{name}`"] + [m[k] for k in keys] for name, m in metrics.items()]),
            Image("truth.png", "Estimated score against the ground truth, one point per row.")]


def _examples(dataset: Dataset, columns: dict[str, np.ndarray], top_k: int, out: Path) -> list[Block]:
    label_column = next((c for c in LABEL_COLUMNS if c in dataset.column_names), None)
    image_column = next((c for c in IMAGE_COLUMNS if c in dataset.column_names), None)
    text_column = next((c for c in TEXT_COLUMNS if c in dataset.column_names), None) or next(
        (c for c, f in dataset.features.items() if getattr(f, "dtype", None) == "string"), None)
    names = getattr(dataset.features.get(label_column), "names", None) if label_column else None
    rows_view = dataset.with_format("numpy") if image_column == "pixel_values" else dataset.with_format(None)
    blocks: list[Block] = [Heading("Most helpful and most harmful rows")]
    for column, values in columns.items():
        order = np.argsort(values, kind="stable")
        top_k_here = min(top_k, len(values) // 2 or 1)
        chosen = {"most helpful": order[::-1][:top_k_here], "most harmful": order[:top_k_here]}
        for kind, rows in chosen.items():
            records = [rows_view[int(r)] for r in rows]
            labels = [_label(rec.get(label_column), names) if label_column else "" for rec in records]
            table = Table(["row", "score", "label"] + ([text_column] if text_column else []),
                          [[int(r), float(values[r]), lab] + ([_snippet(rec[text_column])] if text_column else [])
                           for r, rec, lab in zip(rows, records, labels)])
            blocks += [Heading(f"`{column}`: {kind}", 3), table]
            if image_column:
                file = f"examples_{column}_{kind.replace(' ', '_')}.png"
                images = np.stack([_image(rec[image_column]) for rec in records])
                captions = [f"row {int(r)}\nlabel {lab}\n{values[r]:.2e}" for r, lab in zip(rows, labels)]
                colour = plots.HELPFUL if kind == "most helpful" else plots.HARMFUL
                plots.thumbnails(images, captions, [colour] * len(rows), f"{column}: {kind}", out / file)
                blocks.append(Image(file, f"{kind.capitalize()} rows by `{column}`: row index, label, score."))
            elif not text_column and "input_ids" in dataset.column_names:
                blocks.append(Paragraph("No text column: first token ids " + "; ".join(
                    f"row {int(r)}: {list(np.asarray(rec['input_ids'])[:12])}" for r, rec in zip(rows, records))))
    return blocks


def _label(value, names) -> str:
    if value is None:
        return ""
    value = np.asarray(value)
    if value.ndim:
        return str(value.tolist())
    return names[int(value)] if names and 0 <= int(value) < len(names) else str(value.item())


def _snippet(text, width: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _image(value) -> np.ndarray:
    """(H, W) or (H, W, 3) in [0, 1] from channel-first pixel values or a PIL image."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    low, high = array.min(), array.max()
    return (array - low) / (high - low) if high > low else np.zeros_like(array)
