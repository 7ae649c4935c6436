"""Pruning keeps and drops exactly the rows the ranking says (oracle: numpy argsort), and refuses bad requests
before reading any data."""

import numpy as np
import pytest
from datasets import Dataset

from hf_accinf import AccInfError
from hf_accinf.data.columns import add_score_column, read_provenance
from hf_accinf.data.prune import PruneArguments, prune_dataset


@pytest.fixture(scope="module")
def scored():
    rng = np.random.default_rng(1)
    first, second = rng.normal(size=50), rng.normal(size=50)
    data = Dataset.from_dict({"x": list(range(50)), "labels": (np.arange(50) % 2).tolist()})
    data = add_score_column(data, first, "influence_a", {"method": "a"})
    return add_score_column(data, second, "influence_b", {"method": "b"}), first, second


def test_drop_fraction_removes_the_most_harmful_rows(scored):
    data, first, _ = scored
    pruned = prune_dataset(data, PruneArguments(columns=["influence_a"], drop_fraction=0.2))
    dropped = np.argsort(first)[:10]
    assert pruned["x"] == sorted(set(range(50)) - set(dropped.tolist()))
    record = read_provenance(pruned)["prune"]
    assert record["dropped_rows"] == dropped.tolist() and record["num_rows_before"] == 50
    np.testing.assert_array_equal(record["dropped_values"], first[dropped])
    assert read_provenance(pruned)["columns"] == read_provenance(data)["columns"]


def test_keep_top_keeps_the_most_helpful_rows_in_their_order(scored):
    data, _, second = scored
    pruned = prune_dataset(data, PruneArguments(columns=["influence_b"], keep_top=7))
    assert pruned["x"] == sorted(np.argsort(-second)[:7].tolist())


def test_a_weighted_mix_ranks_by_normalized_ranks(scored):
    data, first, second = scored
    ranks = lambda v: np.argsort(np.argsort(v)) / (len(v) - 1.0)  # noqa: E731  (no ties in normal draws)
    mix = (3.0 * ranks(first) + 1.0 * ranks(second)) / 4.0
    pruned = prune_dataset(data, PruneArguments(columns=["influence_a", "influence_b"], weights=[3.0, 1.0], drop_fraction=0.3))
    assert pruned["x"] == sorted(np.argsort(mix, kind="stable")[15:].tolist())


@pytest.mark.parametrize("kwargs, message", [
    (dict(drop_fraction=1.0), r"must lie in \[0, 1\)"),
    (dict(drop_fraction=-0.1), r"must lie in \[0, 1\)"),
    (dict(), "exactly one of"),
    (dict(drop_fraction=0.1, keep_top=3), "exactly one of"),
    (dict(keep_top=0), "positive number"),
    (dict(columns=["a", "b"], weights=[1.0], drop_fraction=0.1), "one weight per column"),
])
def test_bad_requests_are_refused_when_parsed(kwargs, message):
    with pytest.raises(AccInfError, match=message):
        PruneArguments(**kwargs)


def test_unknown_and_non_finite_columns_are_refused(scored):
    data, first, _ = scored
    with pytest.raises(AccInfError, match=r"Unknown score column\(s\) \['influence_c'\]"):
        prune_dataset(data, PruneArguments(columns=["influence_c"], drop_fraction=0.1))
    with pytest.raises(AccInfError, match="exceeds the 50 rows"):
        prune_dataset(data, PruneArguments(columns=["influence_a"], keep_top=51))
    with pytest.raises(AccInfError, match="choose the ranking with --columns|Choose the ranking"):
        prune_dataset(data, PruneArguments(drop_fraction=0.1))
    broken = add_score_column(data, np.where(np.arange(50) == 3, np.nan, first), "influence_a")
    with pytest.raises(AccInfError, match="NaN or infinite"):
        prune_dataset(broken, PruneArguments(columns=["influence_a"], drop_fraction=0.1))
