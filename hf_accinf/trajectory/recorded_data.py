"""The training and evaluation rows of a run recorded by ``hf-accinf train``, rebuilt from its manifest.

The manifest's ``dataset.source`` is the :class:`~hf_accinf.inputs.sources.DataSource` the run was trained
on; :func:`load_recorded_data` rebuilds the same rows from that record alone and checks them against the
recorded content hash, so ``score``, ``prune``, ``report`` and ``push`` need no data arguments.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import AccInfError
from ..inputs.sources import DataSource, build_datasets, collator_for, load_tokenizer
from .schema import content_hash, load_manifest

logger = logging.getLogger(__name__)


def load_recorded_data(run_dir: str | Path):
    """``(train_dataset, eval_dataset or None, collate_fn)`` exactly as ``hf-accinf train`` recorded them.

    >>> train, held_out, collate = load_recorded_data("runs/quickstart/accinf")  # doctest: +SKIP
    """
    manifest = load_manifest(run_dir)
    record = manifest.dataset.source
    if not record:
        raise AccInfError(f"{run_dir} records no data source (it was not recorded by `hf-accinf train`): "
                          "pass the training and evaluation datasets yourself.")
    source = DataSource.from_dict(record)
    tokenizer = load_tokenizer(source.tokenizer) if source.modality == "text" else None
    logger.info("reloading %s rows of %s as recorded in %s", manifest.dataset.length, source.dataset, run_dir)
    train, held_out = build_datasets(source, manifest.loss.num_labels, tokenizer)
    recorded = manifest.dataset.content_hash
    if recorded is not None and content_hash(train) != recorded:
        raise AccInfError(f"The training rows rebuilt from {source.dataset} differ from those recorded in {run_dir} "
                          "(the data file, the tokenizer or a library changed since training). Restore them, "
                          "or pass the training dataset yourself.")
    return train, held_out, collator_for(source, tokenizer)
