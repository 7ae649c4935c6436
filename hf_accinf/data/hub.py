"""The dataset card of a scored (or pruned) dataset, and pushing both to the Hugging Face Hub.

The card (``README.md`` with a YAML header) explains each score column, its sign convention and its
provenance (:mod:`hf_accinf.data.columns`). :func:`push_scored_dataset` uploads the card first, then
calls the datasets library's own ``Dataset.push_to_hub``, which keeps the card's text and adds its
``configs``/``dataset_info`` to the YAML header. The endpoint is the Hub client's: ``HF_ENDPOINT``,
read when ``huggingface_hub`` and ``datasets`` are imported.
"""

from __future__ import annotations

import json

import yaml
from datasets import Dataset

from .columns import SIGN_CONVENTION, read_provenance, score_columns

CARD_TAGS = ["hf-accinf", "data-attribution", "training-data-influence"]


def dataset_card(dataset: Dataset, title: str | None = None) -> str:
    """Markdown card with YAML header: what each score column means and where it came from."""
    provenance = read_provenance(dataset)
    columns = score_columns(dataset)
    header = {"tags": CARD_TAGS, "pretty_name": title or "Training data with influence scores"}
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
             f"# {header['pretty_name']}", "",
             f"{len(dataset)} training rows, columns {', '.join(f'`{c}`' for c in dataset.column_names)}. "
             "The score columns were computed by hf_accinf from a recorded training run.", "",
             "## Score columns", "", f"Sign convention: {SIGN_CONVENTION}", "",
             "| column | method | removal | form | scope | schedule | evaluation set | run manifest sha256 |",
             "|---|---|---|---|---|---|---|---|"]
    for name in columns:
        entry = provenance["columns"].get(name, {})
        run = entry.get("run") or {}
        cells = [f"`{name}`", entry.get("method"), entry.get("removal"), entry.get("form"), entry.get("scope"),
                 entry.get("schedule"), entry.get("evaluation"), (run.get("manifest_sha256") or "")[:12]]
        lines.append("| " + " | ".join("" if c is None else str(c).replace("|", "/") for c in cells) + " |")
    for name in columns:
        trust = provenance["columns"].get(name, {}).get("trust")
        if trust:
            lines += ["", f"Trust figures of `{name}`: " + ", ".join(f"{k} = {v}" for k, v in trust.items())]
    if "prune" in provenance:
        prune = provenance["prune"]
        lines += ["", "## Pruning", "", f"{prune['num_dropped']} of {prune['num_rows_before']} rows were dropped: "
                  f"{prune['rule']}. Their original row indices and scores are in the provenance below."]
    lines += ["", "## Provenance", "", "```json", json.dumps(provenance, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


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
