"""hf_accinf: trajectory-aware training-data influence for Hugging Face classifiers."""

__version__ = "0.1.0"

from .config import RecordingArguments  # noqa: E402
from .errors import AccInfError  # noqa: E402
from .recording import AccInfTrainer  # noqa: E402
from .trajectory import RunReader, Trajectory  # noqa: E402

__all__ = ["AccInfError", "AccInfTrainer", "RecordingArguments", "RunReader", "Trajectory", "__version__"]
