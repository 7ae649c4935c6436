"""``hf-accinf prune --check``: the pruned rows retrained out by replay, predicted against measured, and the
QLD-style figure. Oracle: the sequential replay (:meth:`~hf_accinf.trajectory.replay.Replay.train`) of the same
rows removed, evaluated by the model itself."""

import pytest
from datasets import load_from_disk
from safetensors.torch import load_file

from hf_accinf import RunReader
from hf_accinf.cli import main
from hf_accinf.data.columns import read_provenance
from hf_accinf.examples import digits_dataset
from hf_accinf.trajectory.replay import Replay
from tests.scoring.lds_helpers import eval_losses, saved_digits_run


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_check")
    data = saved_digits_run(root, 40, 12)
    assert main(["score", "--run_dir", str(root / "run"), *data, "--verify_subsets", "3", "--verify_fraction", "0.1",
                 "--verify_queries", "3", "--trust_probes", "0", "--output_dir", str(root / "scores")]) == 0
    return root, data, digits_dataset(40), digits_dataset(12, offset=40)


def test_prune_check_prints_predicted_against_measured_and_its_measure_is_an_independent_retraining(scored, capsys):
    root, data, train, held_out = scored
    capsys.readouterr()
    assert main(["prune", "--scores_dir", str(root / "scores"), "--drop_fraction", "0.1", "--check", "true", *data,
                 "--output_dir", str(root / "pruned")]) == 0
    printed = capsys.readouterr().out
    assert "check: retrained without the 4 dropped rows" in printed and "predicted" in printed and "QLD:" in printed
    pruned = load_from_disk(str(root / "pruned" / "dataset"))
    prune = read_provenance(pruned)["prune"]
    check, dropped = prune["check"], prune["dropped_rows"]
    scores = load_file(str(root / "scores" / "scores.safetensors"))["scores"].double()
    assert check["predicted"] == pytest.approx(float(scores[dropped].sum()), rel=1e-6)
    run = RunReader(root / "run")
    replay = Replay(run, train)
    recorded = eval_losses(run, run.load_checkpoint(run.num_steps), held_out)
    without = eval_losses(run, replay.train({row: 0.0 for row in dropped}), held_out) - recorded
    assert abs(without.mean().item()) > 1e-4
    assert abs(check["measured"] - without.mean().item()) < 1e-3 * abs(without.mean().item()) + 1e-6
    # QLD: the first query retrained without its own top rows by its per-query scores
    per_query = load_file(str(root / "scores" / "query_scores.safetensors"))
    query = int(per_query["queries"][0])
    top = per_query["scores"][0].topk(len(dropped)).indices.tolist()
    rise = (eval_losses(run, replay.train({row: 0.0 for row in top}), held_out) - recorded)[query].item()
    qld = check["qld"]
    assert qld["queries"] == per_query["queries"].tolist() and abs(qld["rise"][0] - rise) < 1e-3 * abs(rise) + 1e-6
    assert qld["mean_rise"] == pytest.approx(sum(qld["rise"]) / len(qld["rise"]))
    assert "prune --check" in (root / "pruned" / "README.md").read_text()


def test_prune_check_refuses_an_already_pruned_dataset_before_any_work(scored, capsys):
    root, data, _, _ = scored
    assert main(["prune", "--scores_dir", str(root / "scores"), "--drop_fraction", "0.1", "--output_dir",
                 str(root / "plain")]) == 0
    assert main(["prune", "--dataset", str(root / "plain" / "dataset"), "--drop_fraction", "0.1", "--check", "true",
                 *data, "--output_dir", str(root / "again")]) == 2
    assert "not an already pruned one" in capsys.readouterr().err and not (root / "again").exists()
