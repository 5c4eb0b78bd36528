"""Real OpenAI-compatible servers for the server backend's tests and benchmark, each on a free port:
`transformers serve` (the serve extra: FastAPI, uvicorn, openai types) on one local HF checkpoint, and
llama.cpp's server from llama-cpp-python (``python -m llama_cpp.server``) on one GGUF file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`transformers serve` on one checkpoint folder, started and stopped by the caller."""

    name: ClassVar[str] = "transformers serve"
    ready_path: ClassVar[str] = "/health"

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
            assert self.proc.poll() is None, f"{self.name} exited while starting"
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{self.ready_path}", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} did not come up in 120 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # dies like a crashed server: no graceful drain
            self.proc.wait(timeout=30)


LLAMA_CPP_SERVER_MODULES = (
    "llama_cpp",
    "fastapi",
    "uvicorn",
    "sse_starlette",
    "starlette_context",
    "pydantic_settings",
)
"""What ``python -m llama_cpp.server`` imports: llama-cpp-python and its ``[server]`` extra."""


class LlamaCppServer(Server):
    """llama.cpp's server from llama-cpp-python on one GGUF file, served under the name ``alias``.

    It answers one request at a time (llama-cpp-python serialises requests on its one model) and
    computes the logits of every position (``logits_all``, its default), which per-token log-probs
    need."""

    name: ClassVar[str] = "llama_cpp.server"
    ready_path: ClassVar[str] = "/v1/models"

    def __init__(self, gguf: Path, alias: str = "smollm2", threads: int = 1, n_ctx: int = 2048) -> None:
        self.model, self.alias, self.threads, self.n_ctx = gguf, alias, threads, n_ctx
        self.port = free_port()
        self.extra = ()
        self.proc = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--model", str(self.model), "--model_alias", self.alias, "--n_ctx", str(self.n_ctx)]
        cmd += [
            "--n_threads",
            str(self.threads),
            "--n_threads_batch",
            str(self.threads),
            "--verbose",
            "false",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ready()


XLLAMACPP_SCRIPT = """
import sys, time
import xllamacpp as xlc
gguf, port, alias, threads, n_ctx, slots = sys.argv[1:]
p = xlc.CommonParams()
p.model.path = gguf
p.model_alias = {alias}
p.hostnames = ["127.0.0.1"]
p.port = int(port)
p.n_ctx = int(n_ctx) * int(slots)
p.n_parallel = int(slots)
p.cpuparams.n_threads = int(threads)
p.cpuparams_batch.n_threads = int(threads)
server = xlc.Server(p)  # serves HTTP on its own threads until this process is killed
while True:
    time.sleep(3600)
"""


class XLlamaCppServer(LlamaCppServer):
    """llama.cpp's own C++ server (``llama-server``'s code, continuous batching over ``slots``) from the
    prebuilt xllamacpp wheel, in a process of its own. Unlike llama-cpp-python's Python server it gives
    each log-probability entry the token ``id``, which token KD needs."""

    name: ClassVar[str] = "xllamacpp"
    ready_path: ClassVar[str] = "/health"

    def __init__(
        self, gguf: Path, alias: str = "smollm2", threads: int = 1, n_ctx: int = 2048, slots: int = 1
    ) -> None:
        super().__init__(gguf, alias, threads, n_ctx)
        self.slots = slots

    def start(self) -> None:
        args = [
            str(self.model),
            str(self.port),
            self.alias,
            str(self.threads),
            str(self.n_ctx),
            str(self.slots),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", XLLAMACPP_SCRIPT, *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.wait_ready()
