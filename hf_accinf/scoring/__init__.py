"""Scoring a recorded run (:mod:`.run`) and the files it writes (:mod:`.artifacts`)."""

from .artifacts import load_embeddings, load_scores, load_summary, scores_exist
from .run import ScoreResult, attribution_matrix, score_run

__all__ = ["ScoreResult", "attribution_matrix", "load_embeddings", "load_scores", "load_summary", "score_run", "scores_exist"]
