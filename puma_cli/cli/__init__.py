"""The `puma` command line: one short function per command: parse, one job, render.

Only typer, rich (through `console`) and the YAML reader load at import time: each
command imports its job when it runs, so `puma --help` never loads torch or scikit-learn.

`base` holds the Typer app, the error handling every command shares and the rendering;
`options` the options and choices more than one command takes; the commands live in
`model_commands` (make-data, train, import), `removal_commands` (mark, remove, compare),
`audit_commands` (attack, debug-labels, calibrate, eval) and `file_commands` (export,
relink, info), each registering itself on the app as it is imported, in `--help`'s order.
"""

from __future__ import annotations

from puma_cli.cli.base import COMMANDS, app

# Each module registers its commands as it is imported: this order is --help's.
# isort: off
from puma_cli.cli import model_commands, removal_commands, audit_commands, file_commands
# isort: on

REGISTERED = (model_commands, removal_commands, audit_commands, file_commands)
__all__ = ["COMMANDS", "app", "main"]


def main() -> None:
    app(prog_name="puma")
