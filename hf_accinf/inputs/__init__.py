"""The rows going in: where the training and evaluation rows come from (:mod:`.sources`), how a batch is
collated as the ``transformers.Trainer`` would (:mod:`.collate`), and what the model computes on an
evaluation set (:mod:`.evaluation`). A leaf package: it imports nothing of hf_accinf but its errors, so the
recorder, replay, the curvature backends and the scorer all stand on it. The scored datasets going out
(columns, cards, pruning, the Hub) live in :mod:`hf_accinf.data`.
"""
