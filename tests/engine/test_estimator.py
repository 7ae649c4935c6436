"""The engine's entry point takes a rule object and the caller's correction policy; disagreements are refused."""

import pytest

from hf_accinf.engine import CorrectionPolicy, estimate_influence, every_occurrence
from hf_accinf.errors import AccInfError
from hf_accinf.methods.registry import build_method
from tests.engine.helpers import make_problem


def test_a_rule_and_a_policy_that_disagree_are_refused_before_any_work():
    problem = make_problem(num_samples=6)
    with pytest.raises(AccInfError, match="needs a CorrectionPolicy"):
        estimate_influence(problem, build_method(problem, "acc-sgd-ie"))
    with pytest.raises(AccInfError, match="takes no correction"):
        estimate_influence(problem, build_method(problem, "sgd-ie"), CorrectionPolicy("all"))
    with pytest.raises(AccInfError, match="computes scores directly"):
        estimate_influence(problem, build_method(problem, "tracin"))


def test_every_occurrence_is_acc_for_accumulative_rules_and_nothing_for_classical_ones():
    problem = make_problem(num_samples=6)
    assert every_occurrence(build_method(problem, "sgd-ie")) is None
    assert every_occurrence(build_method(problem, "acc-sgd-ie")).kind == "all"
