"""``python -m moe_adapt.export.web install | serve FILE.gguf [--port N] [--host H]``.

``install`` runs ``npm ci`` for the page's runtime (wllama) into this folder's ``node_modules/``;
``serve`` serves the page with one exported GGUF (docs/export.md, "In the browser"). A user error
is one line (``error: ...``) and exit status 2.
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "install":
            print(f"installed: {install()}")
        else:
            serve(args.model, host=args.host, port=args.port)
    except MoEAdaptError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
