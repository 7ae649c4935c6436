"""The recorded training trajectory: run-directory schema and reader."""

from .reader import RunReader, Trajectory
from .replay import Replay, ReplayReport, replay_unavailable
from .schema import Manifest, SCHEMA_VERSION

__all__ = ["Manifest", "Replay", "ReplayReport", "RunReader", "SCHEMA_VERSION", "Trajectory", "replay_unavailable"]
