"""The domain errors the CLI turns into one `Error: ...` line and exit code 1.

Every message names the bad value and says how to fix it. Anything that is not a
PumaError is a bug and keeps its traceback.
"""


class PumaError(Exception):
    """A request that cannot be carried out as asked (bad input, impossible request)."""


class DataError(PumaError):
    """A dataset or ids file that cannot be read or does not fit the request."""


class CheckpointError(PumaError):
    """A model file that is not a usable puma checkpoint."""


class OutputExistsError(PumaError):
    """An output path exists and --overwrite was not given."""


class ConfigError(PumaError):
    """A --config file that cannot be read or names unknown options."""


class DeviceError(PumaError):
    """A --device that this machine does not have."""
