"""``python -m moe_adapt.export.web install | serve FILE.gguf | bench FILE.gguf ...``.

``install`` runs ``npm ci`` for the page's runtime (wllama) into this folder's ``node_modules/``;
``serve`` serves the page with one exported GGUF (docs/export.md, "In the browser"); ``bench`` runs
the page on each file in headless Chromium and prints its tokens/s. A user error is one line
(``error: ...``) and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from moe_adapt.errors import MoEAdaptError
from moe_adapt.export.web import install, serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moe_adapt.export.web", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="npm ci: the page's runtime (@wllama/wllama) into node_modules/")
    s = sub.add_parser("serve", help="serve the page with one exported GGUF file")
    s.add_argument("model", help="a .gguf file of the export stage (<run_dir>/export/gguf/model-<type>.gguf)")
    s.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free one)")
    b = sub.add_parser("bench", help="the page on each file in headless Chromium: tokens/s")
    b.add_argument("models", nargs="+", help=".gguf files")
    b.add_argument("--n", type=int, default=64, help="tokens generated per prompt (default 64)")
    b.add_argument("--letters", action="store_true", help="tick 'letters only' (needed by untrained models)")
    b.add_argument(
        "--threads", type=int, default=None, help="llama.cpp threads (default: wllama's, half the cores)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "install":
            print(f"installed: {install()}")
        elif args.command == "bench":
            from moe_adapt.export.web.browser import bench

            bench(args.models, n=args.n, letters=args.letters, threads=args.threads)
        else:
            serve(args.model, host=args.host, port=args.port)
    except MoEAdaptError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
