"""Scoring a recorded run (:mod:`.run`) and the files it writes (:mod:`.artifacts`)."""

from .artifacts import (
    ScoreArtifact, ScoreSummary, load_embeddings, load_score_artifact, load_scores, read_summary, scores_exist,
)
from .attribution import attribution_matrix
from .run import ScoreResult, score_run

__all__ = ["ScoreArtifact", "ScoreResult", "ScoreSummary", "attribution_matrix", "load_embeddings", "load_score_artifact",
           "load_scores", "read_summary", "score_run", "scores_exist"]
