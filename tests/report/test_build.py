"""The report: Markdown and HTML that link exactly the PNGs written (all valid), top rows as the ranking says,
thumbnails for images and snippets for text, and refusals before any plotting."""

import re

import numpy as np
import pytest
from datasets import ClassLabel, Dataset
from PIL import Image

from hf_accinf import AccInfError
from hf_accinf.data.columns import add_score_column, attach_scores
from hf_accinf.examples import digits_dataset
from hf_accinf.report import ReportArguments, build_report
from tests.data.helpers import fake_run_dir, fake_scores_dir

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def image_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    truth = rng.normal(size=60) * 1e-3
    first, second = truth + rng.normal(size=60) * 2e-4, truth + rng.normal(size=60) * 6e-4
    np.save(root / "truth.npy", truth)
    run = fake_run_dir(root / "run")
    data = attach_scores(digits_dataset(60), fake_scores_dir(root / "a", first, "sgd-ie", run))
    rows = [3, 11, 29, 40, 52]
    check = {"k": 5, "rows": rows, "kendall_tau": 0.6, "kendall_tau_interval": [0.2, 0.8], "pearson_r": 0.9, "sign_agreement": 0.8,
             "linearity_ceiling": {"kendall_tau": 1.0, "pearson_r": 0.99}, "estimate": second[rows].tolist(),
             "truth": truth[rows].tolist()}
    data = attach_scores(data, fake_scores_dir(root / "b", second, "acc-sgd-ie", run, trust={"probe_tau": 0.8},
                                               verify=check))
    report = build_report(data, ReportArguments(output_dir=str(root / "out"), truth=str(root / "truth.npy"), top_k=4))
    return report, first, second


def linked_images(text: str) -> set[str]:
    return set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text))


def test_the_markdown_and_html_link_exactly_the_valid_pngs_written(image_report):
    report, _, _ = image_report
    markdown, html = report.markdown.read_text(), report.html.read_text()
    written = {path.name for path in report.markdown.parent.glob("*.png")}
    assert linked_images(markdown) == written == set(re.findall(r'<img src="([^"]+)"', html))
    assert {"distributions.png", "agreement.png", "verify.png", "truth.png",
            "examples_influence_sgd_ie_most_harmful.png"} <= written
    for name in written:
        path = report.markdown.parent / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            image.verify()


def test_sections_follow_the_scores(image_report):
    report, first, second = image_report
    markdown = report.markdown.read_text()
    section = markdown.split("### `influence_acc_sgd_ie`: most harmful")[1].split("###")[0]
    rows = [int(line.split("|")[1]) for line in section.splitlines() if re.match(r"\| \d+ \|", line)]
    assert rows == np.argsort(second)[:4].tolist()
    from scipy.stats import kendalltau

    assert f"{kendalltau(first, second).statistic:.4g}" in markdown.split("## Agreement between columns")[1]
    assert "probe_tau" in markdown and "kendall_tau" in markdown.split("## Estimate against ground truth")[1]
    verify = markdown.split("## Agreement with rows retrained out (--verify)")[1].split("\n#")[0]
    assert "| `influence_acc_sgd_ie` | 5 | 0.6 [0.2, 0.8] | 0.9 | 0.8 | 1 | 0.99 |" in verify  # tau with its interval
    assert "`influence_sgd_ie`" not in verify  # a column scored without --verify has no row


def test_text_rows_are_shown_as_snippets_with_label_names(tmp_path):
    texts = [f"review number {i} " + "word " * 40 for i in range(10)]
    data = Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(10)]})
    data = data.cast_column("label", ClassLabel(names=["negative", "positive"]))
    scores = np.linspace(-1, 1, 10)
    report = build_report(add_score_column(data, scores, "influence_tracin", {"method": "tracin"}),
                          ReportArguments(output_dir=str(tmp_path / "out"), top_k=2))
    markdown = report.markdown.read_text()
    assert "| 0 | -1 | negative | review number 0 word" in markdown and "…" in markdown
    assert {p.name for p in report.images} == {"distributions.png"} == linked_images(markdown)


def test_bad_inputs_are_refused_before_any_plot(tmp_path):
    data = Dataset.from_dict({"labels": [0, 1, 0]})
    with pytest.raises(AccInfError, match="No score columns"):
        build_report(data, ReportArguments(output_dir=str(tmp_path / "a")))
    scored = add_score_column(data, [0.1, -0.2, 0.3], "influence_x")
    np.save(tmp_path / "short.npy", np.zeros(2))
    with pytest.raises(AccInfError, match="holds 2 values .* for 3 rows"):
        build_report(scored, ReportArguments(output_dir=str(tmp_path / "b"), truth=str(tmp_path / "short.npy")))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("x")
    with pytest.raises(AccInfError, match="not empty"):
        build_report(scored, ReportArguments(output_dir=str(tmp_path / "c")))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(AccInfError, match="--top_k 0"):
        ReportArguments(output_dir="x", top_k=0)
