"""The browser page of the export stage: an exported GGUF in wllama (llama.cpp in WebAssembly).

The folder ships ``index.html`` + ``app.js`` (the page), ``package.json`` + ``package-lock.json`` (its
one npm dependency, ``@wllama/wllama``, pinned). :func:`install` runs ``npm ci`` into
``node_modules/`` here (git-ignored); :func:`serve` serves the page, that runtime and one GGUF file
on 127.0.0.1 with the headers wllama's threads need. Nothing is fetched from a CDN at run time.

    python -m moe_adapt.export.web install
    python -m moe_adapt.export.web serve runs/tiny/export/gguf/model-q8_0.gguf
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from moe_adapt.errors import MoEAdaptError

log = logging.getLogger(__name__)

__all__ = ["HERE", "RUNTIME", "install", "runtime_installed", "serve", "serving"]

HERE = Path(__file__).resolve().parent
"""The page's folder (index.html, app.js, package.json, package-lock.json, node_modules/)."""

RUNTIME = HERE / "node_modules" / "@wllama" / "wllama"
"""Where ``npm ci`` puts wllama; the page loads ``esm/index.js`` and ``esm/wasm/wllama.wasm`` from it."""

_PAGE_FILES = {"/": "index.html", "/index.html": "index.html", "/app.js": "app.js"}
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".wasm": "application/wasm",
    ".gguf": "application/octet-stream",
    ".map": "application/json",
}


def runtime_installed() -> bool:
    """Whether wllama's module and wasm are in :data:`RUNTIME` (``install`` ran)."""
    return (RUNTIME / "esm" / "index.js").is_file() and (RUNTIME / "esm" / "wasm" / "wllama.wasm").is_file()


def install(npm: str = "npm") -> Path:
    """``npm ci`` in :data:`HERE`: the exact wllama of ``package-lock.json`` into ``node_modules/``.

    Raises:
        MoEAdaptError: npm is missing or fails (its last lines in the message).
    """
    exe = shutil.which(npm)
    if exe is None:
        raise MoEAdaptError(
            f"the browser page needs npm to install its runtime (@wllama/wllama): {npm!r} is not on PATH; "
            "install Node.js (e.g. apt-get install -y npm)"
        )
    cmd = [exe, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--omit=dev"]
    done = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not runtime_installed():
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise MoEAdaptError(f"{' '.join(cmd)} in {HERE} failed (exit {done.returncode}): {tail}")
    log.info("web: wllama installed in %s", RUNTIME)
    return RUNTIME


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD of the page, ``/vendor/wllama/...`` (the npm runtime) and ``/model.gguf``; nothing else.

    Every answer is cross-origin isolated (COOP ``same-origin`` + COEP ``require-corp``), so the page
    gets ``SharedArrayBuffer`` and wllama runs llama.cpp on several threads."""

    model: Path
    server_version = "moe-adapt-web"

    def _resolve(self) -> Path | None:
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        if path in _PAGE_FILES:
            return HERE / _PAGE_FILES[path]
        if path == "/model.gguf":
            return self.model
        prefix = "/vendor/wllama/"
        if path.startswith(prefix):
            target = (RUNTIME / path[len(prefix) :]).resolve()
            if target.is_relative_to(RUNTIME.resolve()) and target.is_file():
                return target
        return None

    def _answer(self, body: bool) -> None:
        file = self._resolve()
        if file is None or not file.is_file():
            self.send_error(404)
            return
        size = file.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", _TYPES.get(file.suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(size))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.end_headers()
        if body:
            with file.open("rb") as f, contextlib.suppress(ConnectionResetError, BrokenPipeError):
                shutil.copyfileobj(f, self.wfile, 1 << 20)  # a client may hang up before the end

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("web: %s", format % args)


def _server(model: str | Path, host: str, port: int) -> http.server.ThreadingHTTPServer:
    model = Path(model)
    if not model.is_file() or model.suffix != ".gguf":
        why = "does not exist" if not model.exists() else "is not a .gguf file"
        raise MoEAdaptError(
            f"web: {str(model)!r} {why} (the export stage writes <run_dir>/export/gguf/*.gguf)"
        )
    if not runtime_installed():
        raise MoEAdaptError(
            f"web: the browser runtime is not installed in {RUNTIME}: "
            "run python -m moe_adapt.export.web install"
        )
    handler = type("Handler", (_Handler,), {"model": model.resolve()})
    return http.server.ThreadingHTTPServer((host, port), handler)


@contextlib.contextmanager
def serving(model: str | Path, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve in a background thread for the block; yields the page's URL (port 0 = a free one)."""
    server = _server(model, host, port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the page with ``model`` until interrupted (Ctrl-C)."""
    server = _server(model, host, port)
    url = f"http://{host}:{server.server_address[1]}/"
    log.info("web: serving %s at %s (Ctrl-C stops)", model, url)
    print(f"moe_adapt web page: {url}  (model {model}; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
