"""scripts/cleanse.py: the retraining is the recording's recipe from scratch with only the batch order changed,
an unknown peer is refused before any work, and a tiny end-to-end run (2 seeds, clean and
noisy, every ranking) writes a page whose markdown tables are well formed and consistent with cleansing.json."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import HfArgumentParser, Trainer

from hf_accinf import AccInfError

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "cleanse.py"


@pytest.fixture(scope="module")
def cleanse():
    spec = importlib.util.spec_from_file_location("cleanse_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe(cleanse, tmp_path_factory):
    config, replaced, *_ = cleanse.CASES["image"]
    replaced = {**replaced, "train_rows": 64, "num_train_epochs": 1}
    return cleanse.ConfigRecipe(str(cleanse.REPOSITORY / config), replaced, tmp_path_factory.mktemp("recipe"), seed=3,
                                validation_rows=16, test_rows=32, data_seed_offset=1000)


def first_epoch_order(recipe, arguments) -> list[float]:
    """The rows of the first epoch in the order the Trainer's dataloader serves them (each row by its pixel sum)."""
    trainer = Trainer(model=recipe.model(), args=arguments, train_dataset=recipe.train, data_collator=recipe.collator)
    return [float(total) for batch in trainer.get_train_dataloader() for total in batch["pixel_values"].sum((1, 2, 3))]


def test_retraining_is_the_same_recipe_from_scratch_with_a_new_batch_order(recipe):
    recorded, retrained = dataclasses.asdict(recipe.training), dataclasses.asdict(recipe.retraining)
    changed = {key for key in recorded if recorded[key] != retrained[key] and key != "logging_dir"}
    assert changed == {"data_seed", "output_dir"} and retrained["data_seed"] == recipe.training.seed + 1000
    first, second = recipe.model().state_dict(), recipe.model().state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)  # the same initialisation, every time
    order, new_order = first_epoch_order(recipe, recipe.training), first_epoch_order(recipe, recipe.retraining)
    assert sorted(order) == sorted(new_order) and order != new_order  # the same rows, served in another order
    assert len(recipe.train) == 64 and len(recipe.validation) == 16 and len(recipe.test) == 32


def test_validation_and_test_rows_are_disjoint_from_training(recipe):
    def signatures(rows):
        return {tuple(np.round(np.asarray(row["pixel_values"]).ravel(), 5)) for row in rows}

    train, validation, test = signatures(recipe.train), signatures(recipe.validation), signatures(recipe.test)
    assert not (train & test) and not (train & validation) and not (validation & test)


def test_an_unknown_peer_is_refused_before_any_work(cleanse, tmp_path):
    with pytest.raises(AccInfError, match="--peer kronfluence: choose from .*kronfluence-ekfac"):
        cleanse.main(["--peer", "kronfluence", "--output_dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def markdown_tables(text: str) -> list[list[list[str]]]:
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def test_the_table_generator_writes_valid_markdown_tables_end_to_end(cleanse, tmp_path):
    page = tmp_path / "CLEANSING.md"
    cleanse.main(["--cases", "image", "--seeds", "0", "1", "--label_noise", "0", "0.25", "--drop_fractions", "0.25",
                  "--train_rows", "24", "--validation_rows", "8", "--test_rows", "16", "--num_train_epochs", "1",
                  "--output_dir", str(tmp_path / "out"), "--table", str(page), "--peer", "kronfluence-identity"])
    text = page.read_text()
    tables = markdown_tables(text)
    assert len(tables) == 2  # the clean table and the noisy one
    for table, noisy in zip(tables, (False, True)):
        header, separator, *rows = table
        assert header[:4] == ["rows removed", "ranking", "test accuracy", "test loss"]
        assert len(header) == 4 + noisy and all(set(cell) == {"-"} for cell in separator)
        assert all(len(row) == len(header) for row in rows)
        rankings = {row[1] for row in rows}
        assert rankings == {"none (all rows)", "random", "influence_default", "influence_head", "influence_tracin",
                            "influence_peer_kronfluence-identity"}
        for row in rows:
            mean, std = map(float, re.fullmatch(r"(\S+) ± (\S+)", row[2]).groups())
            assert 0.0 <= mean <= 1.0 and std >= 0.0
            assert row[0] == ("0" if row[1] == "none (all rows)" else "6")  # floor(0.25 x 24) rows removed
    result = json.loads((tmp_path / "out" / "cleansing.json").read_text())
    noisy = result["cases"]["image"]["noise"]["0.25"]
    flipped = {seed: set(entry["flipped_rows"]) for seed, entry in noisy["seeds"].items()}
    assert all(len(rows) == 6 for rows in flipped.values()) and flipped["0"] != flipped["1"]  # seeded per seed
    default = next(s for s in noisy["summary"] if s["ranking"] == "influence_default")
    assert default["seeds"] == 2 and 0.0 <= default["recall"][0] <= 1.0
    assert "2 seeds" in text and "wall time" in text and "torch threads: 1" in text
    command = next(line.split() for line in text.splitlines() if line.startswith("    python scripts/cleanse.py"))
    (parsed,) = HfArgumentParser(cleanse.CleanseArguments).parse_args_into_dataclasses(args=command[2:])
    assert dataclasses.asdict(parsed) == {**result["arguments"], "rerender": False}  # the page's command reproduces it
    page.unlink()
    cleanse.main(["--output_dir", str(tmp_path / "out"), "--table", str(page), "--rerender"])
    assert page.read_text() == text  # the page again from cleansing.json, no runs
    with pytest.raises(AccInfError, match="--rerender needs"):
        cleanse.main(["--output_dir", str(tmp_path / "missing"), "--table", str(page), "--rerender"])
