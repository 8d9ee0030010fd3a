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


SEED_MAX = 2**32 - 1  # numpy's and torch's generators both take seeds in 0..2**32-1


def require_range(
    flag: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Refuse a NaN, an infinity, or a number outside [low, high] (open where asked),
    naming the option and the range it takes."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if value == value and abs(value) != float("inf") and not too_low and not too_high:
        return
    if low is not None and high is not None:
        span = (
            f"a number in {'(' if low_open else '['}{_number(low)}, "
            f"{_number(high)}{')' if high_open else ']'}"
        )
    elif low is not None:
        span = f"a number {'>' if low_open else '>='} {_number(low)}"
    else:
        assert high is not None
        span = f"a number {'<' if high_open else '<='} {_number(high)}"
    raise PumaError(f"{flag} {_number(value)} is out of range; give {span}")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
