"""`python -m sparsedsl.bench [options]`: the same as `sparsedsl bench`."""
from __future__ import annotations

import argparse
import sys

from . import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparsedsl.bench",
        description="Time sparsedsl's kernels against SDPA, FlexAttention and fla on a GPU.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
