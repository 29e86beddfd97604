"""The `aiportal` command line."""
from __future__ import annotations

import argparse
import sys

from portal import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aiportal", description="Slurm-backed AI training and inference portal")
    parser.add_argument("--version", action="version", version="aiportal %s" % __version__)
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
