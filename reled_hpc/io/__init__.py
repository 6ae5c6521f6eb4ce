"""HDF5 trajectory dumps: the writer the learner appends to and the lazy reader analysis uses."""

from .reader import TrajectoryReader, clear_status_flags
from .schema import SCHEMA_VERSION
from .writer import TrajectoryWriter

__all__ = ["SCHEMA_VERSION", "TrajectoryReader", "TrajectoryWriter", "clear_status_flags"]
