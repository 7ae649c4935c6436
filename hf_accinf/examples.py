"""Offline example data and tiny models for the tests and the paper scripts (the quickstart is configs/quickstart.yaml).

Nothing here downloads: images are scikit-learn's bundled 8x8 digits, text is synthetic token
sequences, and models are built from config objects.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification


def digits_dataset(num_rows: int | None = None, classes: tuple[int, ...] | None = None, seed: int = 0,
                   offset: int = 0) -> Dataset:
    """scikit-learn's digits as ``pixel_values`` (1 x 8 x 8, scaled to [0, 1]) and ``labels``: rows
    ``offset .. offset + num_rows`` of a seeded permutation (disjoint offsets give disjoint splits)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images.astype(np.float32) / 16.0, digits.target
    if classes is not None:
        keep = np.isin(labels, classes)
        images, labels = images[keep], np.searchsorted(np.asarray(sorted(classes)), labels[keep])
    order = np.random.default_rng(seed).permutation(len(labels))[offset:]
    order = order[:num_rows]
    return Dataset.from_dict({"pixel_values": images[order][:, None].tolist(), "labels": labels[order].tolist()}).with_format("torch")


def tiny_vit(num_labels: int = 10, seed: int = 0, hidden_size: int = 32) -> ViTForImageClassification:
    import torch

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=hidden_size, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=2 * hidden_size, num_labels=num_labels,
    )
    return ViTForImageClassification(config)


def synthetic_text_dataset(num_rows: int = 96, length: int = 12, vocab_size: int = 40, seed: int = 0) -> Dataset:
    """Token sequences labelled 1 when token 7 occurs more often than token 9 (learnable, offline)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab_size, size=(num_rows, length))
    labels = ((ids == 7).sum(1) > (ids == 9).sum(1)).astype(np.int64)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(), "labels": labels.tolist()}
    ).with_format("torch")


def tiny_bert(num_labels: int = 2, seed: int = 0, vocab_size: int = 40) -> BertForSequenceClassification:
    import torch

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=num_labels,
    )
    return BertForSequenceClassification(config)
