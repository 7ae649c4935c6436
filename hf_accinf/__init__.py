"""hf_accinf: trajectory-aware training-data influence for Hugging Face classifiers."""

from .config import RecordingArguments, ScoreArguments
from .data.columns import add_score_column
from .engine import CorrectionPolicy, estimate_influence
from .errors import AccInfError
from .problem import InfluenceProblem, problem_from_run
from .recording import AccInfTrainer
from .scoring import attribution_matrix, score_run
from .trajectory import RunReader, Trajectory
from .version import __version__

__all__ = [
    "AccInfError",
    "AccInfTrainer",
    "CorrectionPolicy",
    "InfluenceProblem",
    "RecordingArguments",
    "RunReader",
    "ScoreArguments",
    "Trajectory",
    "__version__",
    "add_score_column",
    "attribution_matrix",
    "estimate_influence",
    "problem_from_run",
    "score_run",
]
