"""A real OpenAI-compatible server for the server backend's tests and benchmark: `transformers serve`
(the serve extra: FastAPI, uvicorn, openai types) on one local HF checkpoint, on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`transformers serve` on one checkpoint folder, started and stopped by the caller."""

    def __init__(self, model: Path, hub_cache: Path, threads: int = 1, extra: tuple[str, ...] = ()) -> None:
        self.model, self.port, self.hub_cache, self.threads = model, free_port(), hub_cache, threads
        self.extra = extra
        """Further ``transformers serve`` options, e.g. ``("--continuous-batching",)``."""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_CACHE": str(self.hub_cache),
            "OMP_NUM_THREADS": str(self.threads),
        }
        cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", "--host", "127.0.0.1"]
        cmd += [
            "--port",
            str(self.port),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            *self.extra,
            str(self.model),
        ]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ready()

    def wait_ready(self) -> None:
        assert self.proc is not None
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "transformers serve exited while starting"
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("transformers serve did not come up in 120 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # dies like a crashed server: no graceful drain
            self.proc.wait(timeout=30)
