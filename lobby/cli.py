"""The ``lobby`` command."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lobby", description="krmx-lobby: an event-sourced Krmx lobby server")
    parser.parse_args(argv)
    parser.print_help()
    return 0
