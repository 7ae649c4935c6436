"""The scored datasets going out: score columns with their provenance (:mod:`.columns`), dataset cards and the
Hub (:mod:`.hub`), pruning (:mod:`.prune`) and the cleansing check (:mod:`.cleanse`). The rows going in live
in :mod:`hf_accinf.inputs`."""
