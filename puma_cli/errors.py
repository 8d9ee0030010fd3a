"""The domain errors the CLI turns into one `Error: ...` line and exit code 1.

Every message names the bad value and says how to fix it. Anything that is not a
PumaError is a bug and keeps its traceback, but for memory running out (`out_of_memory`),
which is the machine's state, not the request's.
"""

import re


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


def out_of_memory(exc: BaseException) -> str | None:
    """What to say where an allocation failed: the GPU's memory spent (torch's
    OutOfMemoryError) or this machine's (MemoryError, or torch's CPU allocator refusing);
    None for any other exception. The allocator's own figures are kept: what it tried to
    allocate and, on a GPU, what was free."""
    text = " ".join(str(exc).split())
    if type(exc).__name__ == "OutOfMemoryError":
        sentences = text.split(". ")
        detail = ". ".join(sentences[:3]).rstrip(".") if text else "OutOfMemoryError"
        return (
            f"the GPU ran out of memory ({detail}); free it (another process may hold some of "
            "it: nvidia-smi lists them), use one with more memory, or give --device cpu"
        )
    asked = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", text)
    if not isinstance(exc, MemoryError) and asked is None:
        return None
    detail = f"{int(asked.group(1)) / 2**30:.2f} GiB asked for" if asked else "MemoryError"
    return (
        f"this machine ran out of memory ({detail}); close other programs or use a machine "
        "with more memory"
    )
