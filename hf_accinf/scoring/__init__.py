"""Scoring a recorded run (:mod:`.run`), the files it writes (:mod:`.artifacts`) and its partitions (:mod:`.partitions`)."""

from .artifacts import (
    ScoreArtifact, ScoreSummary, load_embeddings, load_score_artifact, load_scores, read_summary, scores_exist,
)
from .attribution import attribution_matrix
from .partitions import aggregate_partitions
from .run import ScoreResult, score_run

__all__ = ["ScoreArtifact", "ScoreResult", "ScoreSummary", "aggregate_partitions", "attribution_matrix", "load_embeddings", "load_score_artifact",
           "load_scores", "read_summary", "score_run", "scores_exist"]
