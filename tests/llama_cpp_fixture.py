"""A real llama.cpp server (llama-cpp-python's `python -m llama_cpp.server`) serving the demo model's GGUF.

For tests/test_llama_cpp_backend.py: the app's --backend-url mode against an engine that is not ours.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

START_SECONDS = 120.0  # a guard against a hang only: the tiny model loads in about a second
MODEL_ALIAS = "demo-tiny-llama.gguf"  # what its /v1/models lists (the default is the file's path)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def llama_cpp_missing() -> str | None:
    """Why the llama.cpp tests cannot run here, or None. Checked without loading libllama in pytest."""
    missing = [
        name for name in ("llama_cpp", "sse_starlette", "gguf") if importlib.util.find_spec(name) is None
    ]
    if not missing:
        return None
    return (
        f"the llama.cpp tests need llama-cpp-python[server] and gguf ({', '.join(missing)} not importable): "
        ".venv/bin/pip install -r requirements-test.txt"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def llama_cpp_server(gguf: Path, log_path: Path, context: int = 512) -> Iterator[str]:
    """Run llama.cpp's OpenAI-compatible server on `gguf` on 127.0.0.1; yield its base URL; stop it."""
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL_ALIAS]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(context), "--n_threads", "1"]
    # The GGUF's own Jinja chat template, not a built-in format; and a request waits for the one before
    # it instead of cutting it short (llama-cpp-python's default), as docs/deployment.md advises.
    command += ["--chat_format", "chat_template.default", "--interrupt_requests", "False"]
    command += ["--verbose", "False"]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(process, url, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def wait_until_ready(process: subprocess.Popen, url: str, log_path: Path) -> None:
    """Poll GET /v1/models until it answers 200; fail with the server's log if it exits or never does."""
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama.cpp's server exited ({process.returncode}):\n{tail(log_path)}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/v1/models", timeout=2.0).status_code == 200:
                return
        time.sleep(0.1)  # between polls only; the deadline decides
    raise RuntimeError(f"llama.cpp's server did not answer within {START_SECONDS:.0f} s:\n{tail(log_path)}")


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
