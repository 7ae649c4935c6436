"""hf_accinf: trajectory-aware training-data influence for Hugging Face classifiers."""

from .version import __version__  # noqa: F401
from .config import RecordingArguments, ScoreArguments  # noqa: E402
from .data.columns import add_score_column  # noqa: E402
from .engine import CorrectionPolicy, estimate_influence  # noqa: E402
from .errors import AccInfError  # noqa: E402
from .problem import InfluenceProblem, problem_from_run  # noqa: E402
from .recording import AccInfTrainer  # noqa: E402
from .scoring import attribution_matrix, score_run  # noqa: E402
from .trajectory import RunReader, Trajectory  # noqa: E402

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
