"""Evaluation against ground truth: metrics (:mod:`.metrics`), exact leave-one-out retraining of small
models (:mod:`.retrain`, :mod:`.optim`), comparing saved scores with a truth (:mod:`.compare`), and the paper
harness (:mod:`.paper`)."""
