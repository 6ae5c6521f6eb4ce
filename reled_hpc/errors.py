"""Exception types. Each names the file or key at fault so a user can act on it."""


class ReledError(Exception):
    """Base class of every error this package raises on bad input or state."""


class MapError(ReledError):
    """A map source or built map folder is missing, malformed or unusable."""


class ConfigError(ReledError):
    """A configuration is invalid: unknown key, wrong type or impossible value."""


class EnvError(ReledError):
    """The environment was misused (bad action, second live simulation, ...)."""


class SetupError(ReledError):
    """The installation is incomplete (missing SUMO binary, fastdtw without C extension)."""


class DumpError(ReledError):
    """An HDF5 trajectory dump is missing, malformed, of another schema, or misused (bad rows, duplicate iteration)."""
