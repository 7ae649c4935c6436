"""hf_accinf: trajectory-aware training-data influence for Hugging Face classifiers."""

from .config import RecordingArguments, ScoreArguments
from .data.columns import add_score_column, attach_scores, write_dataset_column
from .engine import CorrectionPolicy, estimate_influence
from .errors import AccInfError
from .problem import InfluenceProblem, problem_from_run
from .recording import AccInfTrainer
from .scoring import attribution_matrix, load_score_artifact, score_run
from .scoring.plan import ScoringPlan, plan_scoring
from .scoring.retraining import retrain_many
from .scoring.verify import verify
from .trajectory import RunReader, Trajectory
from .trajectory.replay import Replay
from .version import __version__

__all__ = [
    "AccInfError",
    "AccInfTrainer",
    "CorrectionPolicy",
    "InfluenceProblem",
    "RecordingArguments",
    "Replay",
    "RunReader",
    "ScoreArguments",
    "ScoringPlan",
    "Trajectory",
    "__version__",
    "add_score_column",
    "attach_scores",
    "attribution_matrix",
    "estimate_influence",
    "load_score_artifact",
    "plan_scoring",
    "problem_from_run",
    "retrain_many",
    "score_run",
    "verify",
    "write_dataset_column",
]
