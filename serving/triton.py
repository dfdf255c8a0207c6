"""Start and stop a local tritonserver against a model repository.

The server is the ``tritonserver`` binary shipped in the ``nvidia-pytriton`` wheel (only the
python backend is bundled), or another one named by ``KUBERANK_TRITONSERVER``. It binds only
127.0.0.1 on free ports; every wait is bounded; a repository the server refuses raises
:class:`TritonStartError` carrying the server's own messages (from its log and its repository
index API). The repository is only read (the server runs on a linked view of it in a temporary
directory), and a server started from the main thread ends when this process dies.

    with TritonServer("STORE/triton-local") as server:   # start() + wait_ready()
        client = tritonclient.http.InferenceServerClient(server.http_url)

Python-backend models run in stub processes with this interpreter's packages (numpy 1.x:
the bundled stub misreads string tensors under numpy 2.x) on PYTHONPATH.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
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
import uuid
from pathlib import Path

from kuberank.errors import KuberankError

HOST = "127.0.0.1"
ENV_BINARY = "KUBERANK_TRITONSERVER"
# CPU-only machines: the server logs these as errors although nothing is wrong
_LOG_NOISE = (
    "CudaDriverHelper has not been initialized",
    "Unable to allocate pinned system memory",
)
_LOG_ERROR = re.compile(r"^E\d{4} |error|failed|Invalid argument|Unexpected", re.IGNORECASE)


class TritonStartError(KuberankError):
    """The server exited, refused the repository or did not become ready in time."""


def _pytriton_root() -> Path | None:
    try:
        import pytriton  # local: heavy (pytriton), only starting Triton needs it
    except ImportError:
        return None
    return Path(pytriton.__file__).resolve().parent


def find_tritonserver() -> Path:
    """The tritonserver binary: ``$KUBERANK_TRITONSERVER``, the one in nvidia-pytriton, or
    ``tritonserver`` on PATH."""
    override = os.environ.get(ENV_BINARY)
    if override:
        path = Path(override)
        if not path.is_file():
            raise KuberankError(f"{ENV_BINARY}={override}: no such file")
        return path
    root = _pytriton_root()
    if root is not None:
        bundled = root / "tritonserver" / "bin" / "tritonserver"
        if bundled.is_file():
            return bundled
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path)
    raise KuberankError(
        "tritonserver not found: install nvidia-pytriton (ships a CPU tritonserver with the "
        f"python backend) or set {ENV_BINARY}"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _python_backend_dir(binary: Path, dest: Path) -> Path | None:
    """Assemble ``dest/python`` with the python backend and this interpreter's stub (the wheel
    ships one stub per Python version). Returns the backends dir, or None when the server's
    own backends directory is to be used."""
    server_root = binary.parent.parent
    backend = server_root / "backends" / "python"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not (backend / "libtriton_python.so").is_file():
        return None
    if not stub.is_file():
        stub = backend / "triton_python_backend_stub"
        if not stub.is_file():
            raise KuberankError(f"{server_root}: no python backend stub for Python {version}")
    target = dest / "python"
    target.mkdir(parents=True, exist_ok=True)
    for src in (backend / "libtriton_python.so", backend / "triton_python_backend_utils.py", stub):
        shutil.copy2(src, target / src.name)
    return dest


def server_env(binary: Path) -> dict[str, str]:
    """Environment for tritonserver and its python-backend stubs: the wheel's bundled libs and
    this interpreter's libpython on LD_LIBRARY_PATH, this environment's packages on PYTHONPATH,
    single-threaded BLAS."""
    env = os.environ.copy()
    libs = [str(binary.parent.parent.parent.parent / "nvidia_pytriton.libs")]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        libs.append(libdir)
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p and os.path.isdir(p))
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = ":".join(dict.fromkeys(paths))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def linked_view(repository: Path, dest: Path) -> Path:
    """``dest``: the directories of ``repository`` made anew, each file a symlink to the
    original. The server is pointed at this view, so whatever it or its stubs write beside the
    models (the stubs import each model.py and write ``__pycache__`` next to it: their embedded
    interpreter is isolated, PYTHONDONTWRITEBYTECODE does not reach it) lands in ``dest``,
    never in the repository, which may be a read-only model store."""
    for root, dirs, files in os.walk(repository, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")  # an earlier writer's leftovers
        here = dest / Path(root).relative_to(repository)
        here.mkdir(parents=True, exist_ok=True)
        for name in files:
            (here / name).symlink_to(os.path.realpath(os.path.join(root, name)))
    return dest


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def parent_death_signal(sig: int = signal.SIGTERM):
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child when this process dies,
    however it dies (SIGKILL, OOM kill): a killed ``kuberank serve`` leaves no tritonserver
    behind. None where that is not available (not Linux) or not sound: the kernel sends the
    signal when the *thread* that forked the child ends, so it is armed only for a child forked
    from the main thread (which lives as long as the process).

    The function only calls a prctl loaded beforehand and ``os.getppid``, as a preexec_fn
    must in a process with threads; a parent that died before the signal was armed makes the
    child exit at once."""
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.restype = ctypes.c_int
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return arm


class TritonServer:
    """One tritonserver process serving ``repository`` on 127.0.0.1.

    ``start()`` launches it, ``wait_ready(timeout)`` blocks until every model is ready (or
    raises with the server's messages), ``stop()`` ends it (SIGINT, then SIGKILL of its own
    process group after ``stop_timeout``). Started from the main thread on Linux, the server
    also gets SIGTERM from the kernel when this process dies without calling ``stop()``
    (:func:`parent_death_signal`); from another thread it outlives a killed process. ``http_url`` / ``grpc_url`` are ``host:port`` as
    tritonclient expects; ``metrics_url`` is a full URL.
    """

    def __init__(
        self,
        repository: str | os.PathLike,
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_verbose: int = 0,
        binary: str | os.PathLike | None = None,
        stop_timeout: float = 15.0,
    ):
        self.repository = Path(repository).resolve()
        self.binary = Path(binary) if binary else find_tritonserver()
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log_verbose = log_verbose
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen | None = None
        # a unique shared-memory prefix: several servers (tests, a dev server) can coexist
        self.shm_prefix = f"kuberank-{uuid.uuid4().hex[:10]}"
        self._workdir: Path | None = None
        self.served_repository: Path | None = None  # the linked view the server reads
        self.log_path: Path | None = None

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    def command(self, backend_dir: Path | None, repository: Path | None = None) -> list[str]:
        cmd = [
            str(self.binary),
            f"--model-repository={repository or self.repository}",
            f"--http-address={HOST}",
            f"--http-port={self.http_port}",
            f"--grpc-address={HOST}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={HOST}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--exit-timeout-secs=5",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        if backend_dir is not None:
            cmd.append(f"--backend-directory={backend_dir}")
        return cmd

    @property
    def directory(self) -> Path | None:
        """The server's temporary directory while it runs (backends, the served repository's
        links, its log); :meth:`stop` removes it."""
        return self._workdir

    def start(self) -> TritonServer:
        if self.process is not None:
            raise KuberankError("tritonserver already started")
        if not self.repository.is_dir():
            raise KuberankError(f"{self.repository}: no such model repository")
        self._workdir = Path(tempfile.mkdtemp(prefix="kuberank-triton-"))
        try:
            backend_dir = _python_backend_dir(self.binary, self._workdir / "backends")
            self.served_repository = linked_view(self.repository, self._workdir / "models")
            self.log_path = self._workdir / "tritonserver.log"
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    self.command(backend_dir, self.served_repository),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=server_env(self.binary),
                    cwd=self._workdir,
                    start_new_session=True,  # its own process group: stop() ends the stubs too
                    # SIGTERM when this process dies without stop(): the server shuts down as
                    # on Ctrl-C (its stubs exit, their shared-memory regions are removed)
                    preexec_fn=parent_death_signal(signal.SIGTERM),
                )
        except BaseException:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            raise
        return self

    def _get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        url = f"http://{self.http_url}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def repository_index(self) -> list[dict]:
        """The server's view of its models (name, version, state, reason)."""
        req = urllib.request.Request(
            f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST"
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read() or b"[]")

    def log_text(self) -> str:
        """The server's log, naming the repository rather than its linked view."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self._unview(self.log_path.read_text(errors="replace"))

    def _unview(self, text: str) -> str:
        if self.served_repository is None:
            return text
        return text.replace(str(self.served_repository), str(self.repository))

    def _server_messages(self) -> str:
        """The server's own account of what went wrong: models not READY with their reasons
        (if the API is up) and the error lines of its log."""
        parts = []
        try:
            for model in self.repository_index():
                if model.get("state") != "READY":
                    parts.append(
                        f"model {model.get('name')} v{model.get('version', '?')}: "
                        f"{model.get('state', 'UNKNOWN')}: {model.get('reason', '')}".rstrip(": ")
                    )
        except (OSError, ValueError):
            pass
        errors = [
            line
            for line in self.log_text().splitlines()
            if _LOG_ERROR.search(line) and not any(noise in line for noise in _LOG_NOISE)
        ]
        parts.extend(errors[-20:])
        if not parts:
            parts = self.log_text().splitlines()[-20:]
        return self._unview("\n".join(parts))

    def wait_ready(self, timeout: float = 120.0) -> TritonServer:
        """Block until the server reports ready; raise TritonStartError with the server's
        messages if it exits or is not ready within ``timeout`` seconds."""
        if self.process is None:
            raise KuberankError("tritonserver not started")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise TritonStartError(
                    f"tritonserver exited with code {code} on {self.repository}:\n{self._server_messages()}"
                )
            try:
                status, _ = self._get("/v2/health/ready", timeout=1.0)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.25)
        messages = self._server_messages()
        self.stop()
        raise TritonStartError(
            f"tritonserver not ready after {timeout:.0f}s on {self.repository}:\n{messages}"
        )

    def wait(self, timeout: float | None = None) -> int:
        """Block until the server exits (e.g. ``kuberank serve`` in the foreground); its exit
        code. ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
        if self.process is None:
            raise KuberankError("tritonserver not started")
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """Stop the server and its stub processes; bounded."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGINT)
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
            except ProcessLookupError:
                pass
        if process is not None:
            try:  # stubs left behind by a crashed server share its process group
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        # a server that failed to load a model leaves its python-backend regions behind
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
