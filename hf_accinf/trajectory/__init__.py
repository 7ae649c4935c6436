"""The recorded training trajectory: run-directory schema and reader."""

from .reader import RunReader, Trajectory
from .schema import Manifest, SCHEMA_VERSION

__all__ = ["Manifest", "RunReader", "SCHEMA_VERSION", "Trajectory"]
