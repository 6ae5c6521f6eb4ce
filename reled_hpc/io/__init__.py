"""HDF5 trajectory dumps: the writer the learner appends to, the lazy reader analysis uses, and the
salvage reader for the readable part of a damaged dump."""

from .reader import TrajectoryReader, clear_status_flags
from .salvage import SalvageReader, cut_short
from .schema import SCHEMA_VERSION
from .writer import TrajectoryWriter

__all__ = ["SCHEMA_VERSION", "SalvageReader", "TrajectoryReader", "TrajectoryWriter", "clear_status_flags", "cut_short"]
