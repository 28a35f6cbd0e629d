"""What every command line of the package shares: `--help` that keeps the description's
layout and shows each option's default, in subcommands too; log lines on stderr."""

from __future__ import annotations

import argparse
import copy
import logging
import sys


def _shows_default(action: argparse.Action) -> bool:
    d = action.default
    return not (d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, (list, tuple)) and not d))


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """`(default: X)` after each option that has one (also where it has no help text);
    unset, off and empty defaults say nothing."""

    def _get_help_string(self, action):
        if not _shows_default(action):
            return action.help
        return super()._get_help_string(action)

    def _format_action(self, action):
        if not action.help and action.option_strings and _shows_default(action):
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with HelpFormatter; the parsers of its subcommands are of this class too."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (pytest and notebooks swap it)."""

    def __init__(self):
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


def log_to_stderr(level: int = logging.INFO) -> None:
    """Show this package's log records from `level` up on stderr; the command-line tools call it.

    A handler on the `segexec_jax` logger itself, not `logging.basicConfig`: importing Orbax
    has already given the root logger a handler (so basicConfig does nothing), and lowering
    the root level would let every library's INFO lines through. Calling it again only
    changes the level."""
    logger = logging.getLogger("segexec_jax")
    logger.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.propagate = False  # the root handler would print each record a second time
