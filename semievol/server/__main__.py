"""``python -m semievol.server``: ``semievol serve``, with the same parser
(``semievol.cli.serve_arguments``) and INFO logging."""
from __future__ import annotations

import argparse
import logging

from ..cli import SERVE_DESCRIPTION, serve_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semievol.server",
                                     description=SERVE_DESCRIPTION)
    serve_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
