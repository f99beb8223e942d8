"""``python -m semievol.server``: the same arguments as ``semievol serve``."""
from __future__ import annotations

import argparse
import logging

from ..backends import registry
from . import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semievol.server",
                                     description="OpenAI-compatible API over a local backend")
    parser.add_argument("--backend", default="hf", choices=registry.names(hosted=False))
    parser.add_argument("--model", default=None, help="base model (default: the backend's)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--state-dir", default=None,
                        help="files, jobs and adapters (default: ./semievol-serve)")
    parser.add_argument("--api-key", default=None,
                        help="bearer token every request needs (visible in `ps`: prefer "
                        "--api-key-file or $SEMIEVOL_API_KEY)")
    parser.add_argument("--api-key-file", default=None,
                        help="bearer token every request needs, read from this file")
    parser.add_argument("--max-upload-mb", type=int, default=512)
    parser.add_argument("--dedicated-lora", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve(args.backend, model=args.model, host=args.host, port=args.port,
          state_dir=args.state_dir, api_key=args.api_key, api_key_file=args.api_key_file,
          max_upload_mb=args.max_upload_mb, dedicated_lora=args.dedicated_lora)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
