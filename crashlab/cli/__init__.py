"""The `crashlab` command line.

Each stage contributes its commands from its own module in this package: a module that defines a
module-level click command or group named `command` (or a list of them named `commands`) is added
to the top-level group. This keeps
every stage's command line beside nothing but itself.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path
from typing import NoReturn

import click

from crashlab import __version__, logformat, netns, rundir, signals

# Exit statuses of the log and crash commands (README.md, "Exit status"); gate and check keep theirs.
EXIT_OK = 0
EXIT_DAMAGED = 1  # the log is damaged inside the entries its superblock promises
EXIT_USAGE = 2  # bad input or option (click uses 2 too): one line on stderr, nothing written
EXIT_SALVAGED = 3  # --salvage used the complete entries of a damaged log; stderr says what was lost
EXIT_INTERRUPTED = signals.EXIT_INTERRUPTED
EXIT_TERMINATED = signals.EXIT_TERMINATED


class CrashlabError(click.ClickException):
    """An error for the user: printed as one line, exit status 2, no traceback."""

    exit_code = EXIT_USAGE


class DamagedLogError(CrashlabError):
    """A damaged log refused: exit status 1, as `log inspect` gives for it."""

    exit_code = EXIT_DAMAGED


def input_error(e: logformat.InputError) -> CrashlabError:
    """The user error for a library's input error: damage refused without --salvage is exit 1."""
    if isinstance(e, logformat.LogDamagedError):
        return DamagedLogError(f"{e} (--salvage uses the complete entries before it)")
    return CrashlabError(str(e))


def salvaged(log: Path, damage: logformat.Damage) -> NoReturn:
    """Say what a --salvage run kept and lost, then exit 3: salvage is never silent."""
    click.echo(f"salvaged: {log}: damaged log: {damage}; read only the {damage.entry} complete "
               "entries before it", err=True)
    sys.exit(EXIT_SALVAGED)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="crashlab")
def cli() -> None:
    """Crash-consistency fault injection for QEMU disk cache modes and filesystem barriers."""


def _load_commands() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for command in [getattr(module, "command", None), *getattr(module, "commands", [])]:
            if isinstance(command, click.Command):
                cli.add_command(command)


_load_commands()


def main() -> None:
    """Exit statuses: 0 done, 1 a finding (damage, failures: per command), 2 bad input, 130 Ctrl-C,
    143 SIGTERM; after an interrupt everything this run started is stopped and removed first."""
    rundir.enter()
    netns.reclaim()  # a killed run's storage-server namespaces, as rundir does its files
    try:
        with signals.sigterm_raises():
            status = cli.main(prog_name="crashlab", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        signals.ignore_more()
        click.echo("interrupted", err=True)
        signals.exit_after_cleanup(EXIT_INTERRUPTED)
    except signals.Terminated:
        signals.ignore_more()
        click.echo("terminated", err=True)
        signals.exit_after_cleanup(EXIT_TERMINATED)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    sys.exit(status if isinstance(status, int) else 0)
