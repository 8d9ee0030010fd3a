"""The Typer app, what every command shares: `Error: ...` and exit 1 for bad input (said
once under torchrun), the torchrun guard and world, the device, and rendering a report."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from puma_cli import console
from puma_cli.errors import PumaError, out_of_memory

if TYPE_CHECKING:
    import torch


app = typer.Typer(
    name="puma",
    help="Remove marked training points from a trained PyTorch classifier (PUMA), and prove it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

F = TypeVar("F", bound=Callable[..., Any])
COMMANDS = (
    "make-data",
    "train",
    "import",
    "mark",
    "remove",
    "compare",
    "attack",
    "debug-labels",
    "calibrate",
    "eval",
    "export",
    "relink",
    "info",
)  # in --help's order


PARALLEL_COMMANDS = ("remove", "attack")  # what torchrun may start (`puma_cli.parallel`)


FOLLOWER_GRACE = 5.0  # seconds a process of rank > 0 waits before reporting an error


def _follower() -> bool:
    """A process of rank > 0 under torchrun: rank 0 reports; the input is the same in all."""
    return os.environ.get("RANK", "0") not in ("", "0")


def _report(message: str) -> None:
    """`Error: message`, once under torchrun. Every process meets the same input, so rank 0
    says it, and torchrun stops the others as soon as rank 0 exits. A process of rank > 0
    waits FOLLOWER_GRACE first: exiting at once would let torchrun stop rank 0 before it
    had said anything (it may be a moment behind), and one still running after the wait
    met an error of its own (its GPU, say), which it then says."""
    if _follower():
        time.sleep(FOLLOWER_GRACE)
    console.error(message)


def domain_errors(fn: F) -> F:
    """Turn a PumaError (or an OS refusal such as a full disk), memory running out (the
    GPU's or the machine's), or any exception raised in a user's architecture file, into
    `Error: ...` and exit 1 (said once under torchrun, by rank 0: every process meets the
    same input)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PumaError as exc:
            _report(str(exc))
            raise typer.Exit(1) from None
        except OSError as exc:
            _report(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
            raise typer.Exit(1) from None
        except Exception as exc:
            from puma_cli.models.user import raised_in_user_code

            said = out_of_memory(exc) or raised_in_user_code(exc)  # the memory, wherever
            if said is None:
                raise  # puma's own bug: the traceback is for us
            _report(said)
            raise typer.Exit(1) from None

    wrapper.__doc__ = _reflowed(fn.__doc__)
    return wrapper  # type: ignore[return-value]


def _reflowed(doc: str | None) -> str | None:
    """A command's docstring with each paragraph on one line: typer keeps the single line
    breaks of the paragraphs after the first, and rich then wraps each source line again
    (an 80-column terminal showed a word alone on a line)."""
    if doc is None:
        return None
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(paragraph.split("\n")) for paragraph in paragraphs)


def _version(wanted: bool) -> None:
    """`puma --version`: this version and the ones a bug report needs, read from the
    installed packages' metadata (nothing imported)."""
    if not wanted:
        return
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from puma_cli import __version__

    parts = [f"python {platform.python_version()}"]
    for package in ("torch", "curvlinops-for-pytorch"):
        with contextlib.suppress(PackageNotFoundError):
            parts.append(f"{package.split('-')[0]} {version(package)}")
    typer.echo(f"puma {__version__} ({', '.join(parts)})")
    raise typer.Exit(0)


@app.callback()
def _one_process_unless_parallel(
    ctx: typer.Context,
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", help="Show the version and exit.", callback=_version, is_eager=True
        ),
    ] = False,
) -> None:
    """Refuse torchrun for commands that do not split their work: K copies of `train`
    would write one file K times. Silence torch's own warning about a non-leaf tensor's
    .grad, which moving or casting a TorchScript module (a user's `torch.jit.script`ed
    net) raises inside torch's `Module._apply`: nothing the user can act on."""
    warnings.filterwarnings(
        "ignore", message="The .grad attribute of a Tensor that is not a leaf", category=UserWarning
    )
    world = os.environ.get("WORLD_SIZE", "1")
    if world not in ("", "1") and ctx.invoked_subcommand not in PARALLEL_COMMANDS:
        _report(
            f"torchrun started {world} processes, but `puma {ctx.invoked_subcommand}` runs "
            f"in one: torchrun splits {' and '.join(PARALLEL_COMMANDS)} only; run it "
            "without torchrun"
        )
        raise typer.Exit(1)


@contextlib.contextmanager
def joined_world(name: str) -> Iterator[tuple[torch.device, bool]]:
    """The device this process computes on and whether it reports (rank 0), with the
    torchrun process group joined inside the block (nothing to join in one process)."""
    from puma_cli import parallel

    device = parallel.join(resolve_device(name))
    try:
        yield device, parallel.leader()
    finally:
        parallel.leave()


def resolve_device(name: str) -> torch.device:
    from puma_cli.devices import resolve_device as resolve

    return resolve(name)


def render(as_json: bool, payload: dict[str, Any], title: str) -> None:
    """One JSON object, or the payload's warnings on stderr and the rest as a table."""
    if as_json:
        console.emit_json(payload)
        return
    for warning in payload.pop("warnings", []):
        console.warn(warning)
    console.table(title, [(k, v) for k, v in payload.items() if v is not None])
