"""`reled-hpc submit | sweep | status`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the launch subcommands to the main parser."""
