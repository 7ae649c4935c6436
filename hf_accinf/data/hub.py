"""A scored (or pruned) dataset on disk and on the Hugging Face Hub, with its dataset card.

The card (``README.md`` with a YAML header) explains each score column, its sign convention, its
provenance (:mod:`hf_accinf.data.columns`: the run, the evaluation set, the arguments) and the checks
its scoring run recorded, as tables: the agreement with rows retrained out (``--verify``), the LDS over
subsets retrained out (``--verify_subsets``) and the trust figures; the report (:mod:`hf_accinf.report`)
shows the same tables (:func:`verify_cells`, :func:`lds_rows`, :func:`trust_rows`). :func:`write_scored_dataset` writes ``dataset/``, ``data.parquet`` and the card
as a whole; :func:`push_scored_dataset` uploads the card first, then calls the datasets library's own
``Dataset.push_to_hub``, which keeps the card's text and adds its ``configs``/``dataset_info`` to the
YAML header. The endpoint is the Hub client's: ``HF_ENDPOINT``, read when ``huggingface_hub`` and
``datasets`` are imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from datasets import Dataset

from ..io import refuse_foreign, write_directory
from ..scoring.artifacts import DATASET_DIR, EvaluationSet
from .columns import CARD_FILE, PARQUET_FILE, PROVENANCE_KEY, SIGN_CONVENTION, read_provenance, score_columns

CARD_TAGS = ["hf-accinf", "data-attribution", "training-data-influence"]
VERIFY_HEADER = ["k", "Kendall tau", "Pearson r", "sign agreement", "linearity ceiling: Kendall tau",
                 "linearity ceiling: Pearson r"]
LDS_HEADER = ["fraction", "subsets x rows", "objective LDS [95%]", "objective ceiling", "per-query LDS [95%]",
              "per-query ceiling", "queries"]
LDS_EXPLANATION = ("Linear datamodeling score: random subsets of the training rows retrained out by replay; Spearman's rho "
                   "across the subsets between the measured change of the evaluation loss and the sum of the subset's "
                   "scores, for the mean evaluation loss (objective) and averaged over single evaluation rows (per "
                   "query, each with its own scores). The ceiling is the same rho for twice the change at half weight: "
                   "the best an estimate linear in the weights can reach on this run. 95% bootstrap intervals over "
                   "subsets (objective) and queries (per query).")
_TRUST_LABELS = {  # in the order tables show them, then embedding_ratio (two rows), then figures not named here
    "growth": "tangent growth over the run (2-norm of M_T-1 ... M_0, a lower bound)",
    "expansive": "expansive (the linearization is not to be trusted)",
    "threshold": "expansive above a growth of",
    "epoch_growth": "tangent growth up to the end of each epoch",
    "log10_growth": "log10 of the tangent growth",
    "probes": "random probes",
    "iterations": "power iterations",
}


def text(value) -> str:
    """A value as a table shows it: floats to 4 significant digits, lists and dicts spelled out."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(text(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k} {text(v)}" for k, v in value.items())
    return str(value)


def verify_cells(verify: dict) -> list[str]:
    """One row of :data:`VERIFY_HEADER` from a ``scores.json`` ``verify`` entry (Kendall tau with its interval
    ``kendall_tau_interval`` when recorded)."""
    tau = text(verify.get("kendall_tau"))
    interval = verify.get("kendall_tau_interval")
    if interval:
        tau += f" [{text(interval[0])}, {text(interval[1])}]"
    ceiling = verify.get("linearity_ceiling") or {}
    return [text(verify.get("k")), tau, text(verify.get("pearson_r")), text(verify.get("sign_agreement")),
            text(ceiling.get("kendall_tau")), text(ceiling.get("pearson_r"))]


def lds_rows(lds: dict) -> list[list[str]]:
    """Rows of :data:`LDS_HEADER` from a ``scores.json`` ``lds`` entry, one per fraction."""
    def rho(part: dict | None) -> str:
        if not part:
            return ""
        interval = part.get("spearman_interval")
        return text(part.get("spearman")) + (f" [{text(interval[0])}, {text(interval[1])}]" if interval else "")

    rows = []
    for report in lds.get("fractions") or []:
        objective, per_query = report.get("objective") or {}, report.get("per_query")
        rows.append([text(report.get("fraction")), f"{lds.get('subsets')} x {report.get('size')}", rho(objective),
                     rho(objective.get("linearity_ceiling")), rho(per_query),
                     rho((per_query or {}).get("linearity_ceiling")), text(len(lds.get("queries") or []))])
    return rows


def trust_rows(trust: dict) -> list[tuple[str, str]]:
    """``(figure, value)`` rows of a ``scores.json`` ``trust`` entry, each figure named for what it measures."""
    order = [*_TRUST_LABELS, "embedding_ratio"]
    rows = []
    for key in sorted(trust, key=lambda k: order.index(k) if k in order else len(order)):
        value = trust[key]
        if key == "embedding_ratio":
            if value:
                rows.append(("embedding / injected norm ratio: median, p90, max",
                             text([value.get("median"), value.get("p90"), value.get("max")])))
                rows.append(("row with the largest embedding ratio", text(value.get("argmax"))))
            continue
        rows.append((_TRUST_LABELS.get(key, key), text(value)))
    return rows


def describe_evaluation(evaluation) -> str:
    """The evaluation set of a column's provenance, in words."""
    if isinstance(evaluation, dict):
        return EvaluationSet(**{k: evaluation.get(k) for k in ("rows", "content_hash", "source")}).describe()
    return evaluation or "not recorded by the scoring run"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    escape = lambda cell: str(cell).replace("|", "/").replace("\n", " ")  # noqa: E731
    return ["| " + " | ".join(map(escape, header)) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(map(escape, row)) + " |" for row in rows]


def dataset_card(dataset: Dataset, title: str | None = None) -> str:
    """Markdown card with YAML header: what each score column means, where it came from and how it was checked."""
    provenance = read_provenance(dataset)
    columns = score_columns(dataset)
    header = {"tags": CARD_TAGS, "pretty_name": title or "Training data with influence scores"}
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
             f"# {header['pretty_name']}", "",
             f"{len(dataset)} training rows, columns {', '.join(f'`{c}`' for c in dataset.column_names)}. "
             "The score columns were computed by hf_accinf from a recorded training run.", "",
             "## Score columns", "", f"Sign convention: {SIGN_CONVENTION}", ""]
    rows = []
    for name in columns:
        entry = provenance["columns"].get(name, {})
        run = entry.get("run") or {}
        rows.append([f"`{name}`", text(entry.get("method")), text(entry.get("removal")), text(entry.get("form")),
                     text(entry.get("scope")), text(entry.get("schedule")), describe_evaluation(entry.get("evaluation")),
                     (run.get("manifest_sha256") or "")[:12]])
    lines += _table(["column", "method", "removal", "form", "scope", "schedule", "evaluation set",
                     "run manifest sha256"], rows)
    for name in columns:
        entry = provenance["columns"].get(name, {})
        if entry.get("verify"):
            lines += ["", f"### `{name}`: agreement with rows retrained out (--verify)", "",
                      "Scores of k random rows against the exact change of the evaluation loss when each is retrained "
                      "out by replay; the linearity ceiling is the best agreement a first-order estimate can reach.", ""]
            lines += _table(VERIFY_HEADER, [verify_cells(entry["verify"])])
        if entry.get("lds"):
            lines += ["", f"### `{name}`: LDS over subsets retrained out (--verify_subsets)", "", LDS_EXPLANATION, ""]
            lines += _table(LDS_HEADER, lds_rows(entry["lds"]))
        if entry.get("trust"):
            lines += ["", f"### `{name}`: trust figures", ""] + _table(["figure", "value"], trust_rows(entry["trust"]))
    if "prune" in provenance:
        prune = provenance["prune"]
        lines += ["", "## Pruning", "", f"{prune['num_dropped']} of {prune['num_rows_before']} rows were dropped: "
                  f"{prune['rule']}. Their original row indices and scores are in the provenance below."]
        if prune.get("check"):
            from ..scoring.lds import describe_pruning_check

            lines += ["", "Checked by retraining the run by replay without them (`prune --check`):", ""]
            lines += [f"- {line}" for line in describe_pruning_check(prune["check"])]
    lines += ["", "## Provenance", "", "```json", json.dumps(provenance, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def write_scored_dataset(dataset: Dataset, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``dataset/`` (``save_to_disk``), ``data.parquet`` (provenance in its schema metadata) and the
    card ``README.md`` into ``directory``, as a whole (:func:`hf_accinf.io.write_directory`)."""
    import pyarrow.parquet as pq

    target = refuse_foreign(directory, overwrite, lambda d: (d / DATASET_DIR).is_dir() and (d / CARD_FILE).is_file())

    def fill(staging: Path) -> None:
        dataset.save_to_disk(str(staging / DATASET_DIR))
        table = dataset.with_format("arrow")[:]
        metadata = dict(table.schema.metadata or {})
        metadata[PROVENANCE_KEY.encode()] = json.dumps(read_provenance(dataset), sort_keys=True).encode()
        pq.write_table(table.replace_schema_metadata(metadata), staging / PARQUET_FILE)
        (staging / CARD_FILE).write_text(dataset_card(dataset))

    return write_directory(target, fill)


def push_scored_dataset(dataset: Dataset, repo_id: str, token: str | None = None, private: bool | None = None,
                        revision: str | None = None, commit_message: str | None = None, split: str = "train") -> str:
    """Upload the card and the dataset (``Dataset.push_to_hub``); return the commit URL of the dataset commit."""
    from datasets import config
    from huggingface_hub import HfApi

    api = HfApi(endpoint=config.HF_ENDPOINT, token=token)
    repo_id = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True).repo_id
    api.upload_file(path_or_fileobj=dataset_card(dataset).encode(), path_in_repo="README.md", repo_id=repo_id,
                    repo_type="dataset", revision=revision, commit_message="Dataset card (hf_accinf score columns)")
    commit = dataset.push_to_hub(repo_id, split=split, token=token, private=private, revision=revision,
                                 commit_message=commit_message or "Upload dataset with hf_accinf score columns")
    return str(commit.commit_url)
