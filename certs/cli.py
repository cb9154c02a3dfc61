"""`hybridroute` subcommands of this area (filled in as the area is built)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this area's subcommands to the top-level parser."""
