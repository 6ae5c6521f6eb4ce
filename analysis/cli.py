"""`reled-hpc analyze ...`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `analyze` subcommand to the main parser."""
