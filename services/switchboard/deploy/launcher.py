"""``switchboard mesh``: the scaled-out shape on one machine (being built)."""

from __future__ import annotations

import argparse
import sys


def add_mesh_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub.add_parser("mesh", help="run the scaled-out shape on this machine")


def run_mesh(args: argparse.Namespace) -> int:
    print("switchboard mesh: not built yet", file=sys.stderr)
    return 2
