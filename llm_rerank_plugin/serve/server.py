"""Run the real Triton Inference Server (the ``tritonserver`` binary that nvidia-pytriton ships) on a model
repository, on CPU, bound to loopback by default.

What the bundled binary needs, set up here at start time (nothing in the environment is changed):

- a backend directory holding the python backend and the ``triton_python_backend_stub`` built for this
  interpreter's minor version (the wheel keeps one stub per Python version apart; PyTriton copies the right
  one in the same way), written under the server's work directory;
- ``LD_LIBRARY_PATH`` with the wheel's ``nvidia_pytriton.libs`` and ``PATH`` starting with this
  interpreter's ``bin`` folder: the stub then runs with this venv's ``sys.prefix`` and site-packages, so
  the exported models import merlin and this package;
- the stub's older embedded CPython is patched by every exported ``model.py`` (``stubfix``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytriton

LOG = logging.getLogger(__name__)
LOG_TAIL_CHARS = 6000


class ServerError(RuntimeError):
    """The server did not start, did not become ready, or exited; the message carries its log tail."""


def tritonserver_dist() -> Path:
    """Folder of the Triton distribution inside the nvidia-pytriton wheel."""
    return Path(pytriton.__file__).parent / "tritonserver"


def _libs_dir() -> Path:
    return Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"


def prepare_backends(work_dir: str | Path) -> Path:
    """Write ``work_dir/backends`` (python backend + the stub for this interpreter); returns that folder."""
    dist = tritonserver_dist()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        available = sorted(p.name for p in (dist / "python_backend_stubs").iterdir())
        raise ServerError(f"nvidia-pytriton has no backend stub for Python {version}; it ships {available}")
    backends = Path(work_dir) / "backends"
    if backends.exists():
        shutil.rmtree(backends)
    shutil.copytree(dist / "backends", backends, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    return backends


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def interpreter_libdir() -> Path | None:
    """Folder of this interpreter's own ``libpython3.X.so`` (None for a statically linked Python)."""
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if (
        sysconfig.get_config_var("Py_ENABLE_SHARED")
        and libdir
        and soname
        and (Path(libdir) / soname).is_file()
    ):
        return Path(libdir)
    return None


def _server_env() -> dict[str, str]:
    env = os.environ.copy()
    # The stub links libpython3.X.so dynamically. Left alone, the loader picks the system's (Debian 12:
    # 3.11.2) while the stub runs with this venv's standard library (3.11.7 here): C extensions of the newer
    # stdlib then fail to load (`_ssl`: undefined symbol _PyModule_Add, reached through dask.distributed
    # when merlin imports). This interpreter's own libpython first makes the two match.
    own = interpreter_libdir()
    if own is None:
        LOG.warning(
            "this Python (%s) has no shared libpython: the backend stub will load the system's, and if its "
            "version differs from this standard library's, models fail to import (e.g. `_ssl: undefined "
            "symbol`); use a Python built with --enable-shared (pyenv's default) for serving",
            sys.version.split()[0],
        )
    libs = [str(p) for p in (own, _libs_dir()) if p is not None]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    # The stub finds its Python (and so sys.prefix, i.e. this venv's site-packages) through PATH.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # One BLAS/torch thread per model instance: instances are processes, and threads inside each only
    # contend for the same cores (measured: more threads per process = higher p99, see STACK.md).
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("CUDA_VISIBLE_DEVICES", "")  # the bundled server and Merlin run on CPU here
    return env


class TritonServer:
    """One ``tritonserver`` process serving ``model_repository``.

    ``start()`` returns once ``/v2/health/ready`` answers 200 (all models loaded) or raises ServerError with
    the log tail; ``stop()`` sends SIGTERM (Triton drains in-flight requests), then SIGKILL after
    ``exit_timeout_s``. Usable as a context manager. Ports default to free ones; ``host`` 127.0.0.1.
    """

    def __init__(
        self,
        model_repository: str | Path,
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        host: str = "127.0.0.1",
        work_dir: str | Path | None = None,
        log_file: str | Path | None = None,
        exit_timeout_s: int = 20,
        extra_args: list[str] | None = None,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"no model repository at {self.model_repository}")
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        if self.http_port == self.grpc_port:
            raise ValueError(f"http_port and grpc_port must differ; both are {self.http_port}")
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="llm_rerank_triton_"))
        self.log_file = Path(log_file) if log_file else self.work_dir / "tritonserver.log"
        self.exit_timeout_s = int(exit_timeout_s)
        self.extra_args = list(extra_args or [])
        self.process: subprocess.Popen | None = None
        self._log: Any = None

    @property
    def http_url(self) -> str:
        """``host:port`` as tritonclient.http expects it."""
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self) -> list[str]:
        backends = self.work_dir / "backends"
        return [
            str(tritonserver_dist() / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--strict-readiness=true",
            # Our configs are complete; auto-complete would start one more stub per model just to import
            # model.py (merlin, torch): minutes of CPU on a small machine.
            "--disable-auto-complete-config",
            *self.extra_args,
        ]

    def start(self, ready_timeout_s: float = 600.0) -> TritonServer:
        if self.process is not None and self.process.poll() is None:
            raise ServerError(f"server already running (pid {self.process.pid})")
        prepare_backends(self.work_dir)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_file, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=_server_env(),
            start_new_session=True,
        )
        try:
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Block until ``/v2/health/ready`` is 200; ServerError (with the log tail) on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise ServerError(
                    f"tritonserver exited with code {code} before it was ready:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            text = self.log_file.read_bytes()[-chars:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return text

    def stop(self) -> int | None:
        """SIGTERM, wait for Triton's own drain (``exit_timeout_s``), then SIGKILL; returns the exit code."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(self.exit_timeout_s + 10)
                except subprocess.TimeoutExpired:
                    # The server's session (start_new_session) also holds the backend stubs.
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
            code = self.process.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def cleanup(self) -> None:
        """Stop, and remove the work directory if this object created it."""
        self.stop()
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        if self.process is None or self.process.poll() is not None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@contextlib.contextmanager
def running_server(model_repository: str | Path, **kwargs: Any) -> Iterator[TritonServer]:
    """``with running_server(repo) as server: ...``: started, ready, stopped and cleaned up after."""
    server = TritonServer(model_repository, **kwargs)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def run_foreground(server: TritonServer, *, announce: Any = print) -> int:
    """Start ``server``, block until SIGINT/SIGTERM or until it exits on its own, stop it; returns its exit
    code (0 after a clean stop on a signal)."""
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        announce(f"serving {server.model_repository} on http://{server.http_url} (gRPC {server.grpc_url}); "
                 f"log {server.log_file}; Ctrl-C stops")  # fmt: skip
        while not stop.wait(0.5):
            if server.process is None or server.process.poll() is not None:
                announce(f"tritonserver exited on its own:\n{server.log_tail()}")
                break
    finally:
        code = server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        announce(f"stopped on {signal.Signals(received[0]).name} (tritonserver exit code {code})")
        return 0 if code in (0, None) else int(code)
    return 1 if code in (0, None) else int(code)
