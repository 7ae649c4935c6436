"""PNG figures of a report (matplotlib, Agg backend: no display needed). Each function writes one file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

HELPFUL, HARMFUL = "#2a7ab0", "#c8442f"


def pyplot():
    try:
        import matplotlib
    except ImportError as error:
        from ..errors import AccInfError

        raise AccInfError("Reports need matplotlib: pip install 'hf_accinf[report]'.") from error

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return path


def _scale(*arrays: np.ndarray) -> tuple[float, str]:
    """A power of ten to divide by, and the label suffix naming it (matplotlib's offset text collides with titles)."""
    largest = max(float(np.abs(a).max()) for a in arrays)
    if largest == 0 or 1e-2 <= largest < 1e3:
        return 1.0, ""
    exponent = int(np.floor(np.log10(largest)))
    return 10.0**exponent, f" (x 1e{exponent})"


def distributions(columns: dict[str, np.ndarray], path: Path) -> Path:
    """One histogram per score column; bars below zero (harmful) and above (helpful) coloured apart."""
    plt = pyplot()
    figure, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.4), squeeze=False)
    for axis, (name, values) in zip(axes[0], columns.items()):
        scale, suffix = _scale(values)
        values = values / scale
        low, high = float(values.min()), float(values.max())
        span = max(high - low, abs(high), 1e-300)
        edges = np.linspace(low - 0.02 * span, high + 0.02 * span, 41)
        counts, edges = np.histogram(values, bins=edges)
        centers = (edges[:-1] + edges[1:]) / 2
        axis.bar(centers, counts, width=np.diff(edges), color=np.where(centers < 0, HARMFUL, HELPFUL), edgecolor="white", linewidth=0.3)
        axis.axvline(0.0, color="black", linewidth=0.8)
        axis.set_title(f"{name}\n{int((values < 0).sum())} harmful (< 0), {int((values > 0).sum())} helpful (> 0)", fontsize=9)
        axis.set_xlabel("score: change of eval loss without the row" + suffix, fontsize=8)
        axis.set_ylabel("rows")
    return _save(figure, path)


def agreement(columns: dict[str, np.ndarray], taus: dict[tuple[str, str], float], path: Path) -> Path:
    """Scatter of every pair of score columns, with Kendall's tau in the title."""
    plt = pyplot()
    pairs = list(taus)
    figure, axes = plt.subplots(1, len(pairs), figsize=(4.0 * len(pairs), 3.8), squeeze=False)
    for axis, (first, second) in zip(axes[0], pairs):
        (x_scale, x_suffix), (y_scale, y_suffix) = _scale(columns[first]), _scale(columns[second])
        x, y = columns[first] / x_scale, columns[second] / y_scale
        axis.scatter(x, y, s=8, alpha=0.6, color=HELPFUL, edgecolors="none")
        axis.axhline(0.0, color="grey", linewidth=0.5)
        axis.axvline(0.0, color="grey", linewidth=0.5)
        axis.set_xlabel(first + x_suffix, fontsize=8)
        axis.set_ylabel(second + y_suffix, fontsize=8)
        axis.set_title(f"Kendall tau = {taus[(first, second)]:.3f}", fontsize=9)
    return _save(figure, path)


def _estimate_against_truth(axis, truth: np.ndarray, estimate: np.ndarray, name: str, title: str,
                            truth_label: str = "ground truth") -> None:
    """Truth on x, the estimate on y (one scale for both), and the diagonal where they agree."""
    scale, suffix = _scale(truth, estimate)
    truth, estimate = truth / scale, estimate / scale
    axis.scatter(truth, estimate, s=8 if len(truth) > 30 else 18, alpha=0.6 if len(truth) > 30 else 0.9, color=HELPFUL,
                 edgecolors="none")
    low, high = float(min(truth.min(), estimate.min())), float(max(truth.max(), estimate.max()))
    axis.plot([low, high], [low, high], color="black", linewidth=0.8, label="estimate = truth")
    axis.axhline(0.0, color="grey", linewidth=0.5)
    axis.axvline(0.0, color="grey", linewidth=0.5)
    axis.set_xlabel(truth_label + suffix, fontsize=8)
    axis.set_ylabel(f"estimate: {name}{suffix}", fontsize=8)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7, loc="upper left")


def versus_truth(columns: dict[str, np.ndarray], truth: np.ndarray, metrics: dict[str, dict], path: Path) -> Path:
    """Estimate against ground truth for each score column, with the diagonal."""
    plt = pyplot()
    figure, axes = plt.subplots(1, len(columns), figsize=(4.0 * len(columns), 3.8), squeeze=False)
    for axis, (name, values) in zip(axes[0], columns.items()):
        _estimate_against_truth(axis, truth, values, name, f"Kendall tau = {metrics[name]['kendall_tau']:.3f}, "
                                f"RMSE = {metrics[name]['rmse']:.2e}")
    return _save(figure, path)


def verify(checks: dict[str, dict], path: Path) -> Path:
    """Per score column with ``--verify`` figures: the estimate of each retrained row against the exact change of the
    evaluation loss without it (truth at weight 0 on x), with the diagonal."""
    plt = pyplot()
    figure, axes = plt.subplots(1, len(checks), figsize=(4.0 * len(checks), 3.8), squeeze=False)
    for axis, (name, check) in zip(axes[0], checks.items()):
        _estimate_against_truth(axis, np.asarray(check["truth"], dtype=np.float64),
                                np.asarray(check["estimate"], dtype=np.float64), name,
                                f"{check['k']} rows retrained out: Kendall tau = {check['kendall_tau']:.3f}",
                                "truth: eval loss change, row retrained out (weight 0)")
    return _save(figure, path)


def thumbnails(images: np.ndarray, captions: list[str], colours: list[str], title: str, path: Path) -> Path:
    """A grid of images (N, H, W) or (N, H, W, 3) with one caption each."""
    plt = pyplot()
    columns = min(len(images), 8)
    rows = int(np.ceil(len(images) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.45 * columns, 1.75 * rows + 0.4), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, image, caption, colour in zip(axes.ravel(), images, captions, colours):
        axis.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
        axis.set_title(caption, fontsize=7, color=colour)
    figure.suptitle(title, fontsize=9)
    return _save(figure, path)
