"""The recorded training trajectory: run-directory schema and reader."""

from .reader import RunReader, Trajectory
from .replay import Replay, ReplayReport
from .schema import Manifest, SCHEMA_VERSION

__all__ = ["Manifest", "Replay", "ReplayReport", "RunReader", "SCHEMA_VERSION", "Trajectory"]
