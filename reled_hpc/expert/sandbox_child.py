"""Sandbox child: runs one LLM-written `plan(api)` program. Started by `sandbox.run_program` as
`python -I -S -B sandbox_child.py` with rlimits (CPU, address space, file size 0, few fds, no core)
and a fresh network namespace already in force (set in the parent's preexec_fn).

Protocol: one JSON object on stdin {"source", "snapshot", "max_output_bytes", "max_print_chars",
"trusted_test": bool}, one JSON object on stdout: {"ok": true, "routes", "stdout", "isolation"} or
{"ok": false, "category", "error", "stdout", "isolation"}. Nothing is ever unpickled.

Order matters. Everything this script will ever need is imported first, including `unicodedata`
(the compiler imports it for non-ASCII identifiers) and ctypes/libseccomp for the lockdown: as root
the interpreter can read its own stdlib, nobody may not (e.g. under a 0700 /root/.pyenv), and after
the lockdown no process can read any file. Then privileges are dropped to nobody (when root),
fork is limited (RLIMIT_NPROC=0; not in preexec_fn, where it would make execve fail with EAGAIN
after the uid change), `confine.lock_down()` applies no_new_privs, Landlock and seccomp for good,
and only then is the untrusted message read.

The program is not re-validated here: the parent validated it before sending, and this process
cannot hold any secret the parent lacks. A validator bug is what the OS layer is for.

Test hook: `--preload=mod1,mod2` (argv, set only by the parent's `_run_unvalidated`) imports those
modules before the lockdown, so the tests can check that the lockdown holds against a program that
has socket, subprocess and ctypes at hand rather than only against one that cannot import them.
"""

from __future__ import annotations

import builtins
import json
import math
import os
import resource
import sys
import traceback
import types
import unicodedata  # noqa: F401  (imported by the compiler for non-ASCII names; no file reads later)
from typing import Any

NOBODY = 65534
_MAX_RANGE = 1_000_000  # the loop rule: `for` over a range of at most this many items
_MAX_ERROR_CHARS = 2000


def _load(filename: str, name: str) -> types.ModuleType:
    """A sibling module by path (`-I` puts no script folder on sys.path; importlib.util costs more to import)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), filename)
    mod = types.ModuleType(name)
    mod.__file__ = path
    with open(path, encoding="utf-8") as f:
        exec(compile(f.read(), path, "exec"), mod.__dict__)
    return mod


navapi = _load("navapi.py", "reled_navapi")
confine = _load("confine.py", "reled_confine")
confine.load_libseccomp()  # while the process can still read /lib


def _net_interfaces() -> list[str] | None:
    try:
        with open("/proc/self/net/dev", encoding="ascii") as f:
            return [line.split(":")[0].strip() for line in f.readlines()[2:]]
    except OSError:
        return None


def _drop_privileges() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:  # read before the uid change: a non-dumpable process may not read its own /proc/self/ns
        info["netns"] = os.readlink("/proc/self/ns/net")
    except OSError:
        info["netns"] = None
    info["net_interfaces"] = _net_interfaces()
    if os.getuid() == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        except OSError as e:
            info["setuid_error"] = str(e)
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    except (ValueError, OSError) as e:
        info["nproc_error"] = str(e)
    info.update(
        uid=os.getuid(),
        euid=os.geteuid(),
        gid=os.getgid(),
        groups=os.getgroups(),
        nproc=resource.getrlimit(resource.RLIMIT_NPROC)[0],
    )
    return info


def _safe_range(*args: int) -> range:
    try:
        r = range(*args)
        n = len(r)
    except OverflowError:
        n = _MAX_RANGE + 1
    if n > _MAX_RANGE:
        raise ValueError(f"range() of more than {_MAX_RANGE} items is not allowed")
    return r


_SAFE_TEXT = (
    "abs all any bool dict divmod enumerate filter float frozenset int isinstance iter len list map max min next "
    "reversed round set sorted str sum tuple zip Exception ValueError KeyError IndexError TypeError "
    "ZeroDivisionError RuntimeError ArithmeticError LookupError"
)
_SAFE = _SAFE_TEXT.split()


def _builtins(printed: list[str], max_chars: int) -> dict[str, Any]:
    def _print(*args: Any, **kwargs: Any) -> None:
        # print is captured (for feedback), not written: stdout carries the result
        if sum(map(len, printed)) < max_chars:
            printed.append(" ".join(str(a) for a in args)[:max_chars] + "\n")

    out = {name: getattr(builtins, name) for name in _SAFE}
    out.update(
        range=_safe_range, print=_print, NavError=navapi.NavError, hypot=math.hypot, sqrt=math.sqrt, inf=math.inf
    )
    return out


def _describe(exc: BaseException) -> str:
    line = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == "<plan>":
            line = lineno
    try:
        msg = str(exc)
    except Exception:
        msg = "<unprintable>"
    where = f" (line {line})" if line is not None else ""
    return f"{type(exc).__name__}: {msg[:_MAX_ERROR_CHARS]}{where}"


def _collect(api: Any, ret: Any, max_bytes: int) -> tuple[str | None, str | None, dict[str, list[str]]]:
    """(category, error, routes): the API's routes, overridden per agent by a returned dict."""
    routes = api.accumulated_routes()
    if ret is not None:
        if not isinstance(ret, dict):
            return "runtime_error", f"plan() must return None or a dict agent -> route, not {type(ret).__name__}", {}
        size = 0
        for a, r in ret.items():
            if not isinstance(a, str) or not isinstance(r, list | tuple):
                return "runtime_error", f"plan() returned a non-route entry for {str(a)[:100]!r}", {}
            size += len(a) + 8 + sum(len(e) + 4 if isinstance(e, str) else 8 for e in r)
            if size > max_bytes:  # checked before encoding: a huge result must not be built twice
                return "output_too_large", f"plan() returned more than {max_bytes} bytes of routes", {}
            if not all(isinstance(e, str) for e in r):
                return "runtime_error", f"route of agent {a!r} must be a list of edge id strings", {}
            routes[a] = list(r)
    return None, None, routes


def _run(msg: dict[str, Any], printed: list[str]) -> dict[str, Any]:
    api = navapi.NavAPI(msg["snapshot"])
    if msg.get("trusted_test"):  # test hook only (sandbox._run_unvalidated): probe the OS limits
        env: dict[str, Any] = {"__builtins__": builtins.__dict__}
    else:
        env = {"__builtins__": _builtins(printed, int(msg.get("max_print_chars", 10_000)))}
    env.update(api.bindings())  # module-level style: move_to_by_shortest_path(a, t) without `api.`
    env["__name__"] = "plan_program"
    try:
        code = compile(msg["source"], "<plan>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        return {"ok": False, "category": "syntax", "error": f"syntax error at line {getattr(e, 'lineno', '?')}: {e}"}
    try:
        exec(code, env)
        plan = env.get("plan")
        if not callable(plan):
            return {"ok": False, "category": "rejected", "error": "the program defines no plan(api) function"}
        ret = plan(api)
        category, error, routes = _collect(api, ret, int(msg["max_output_bytes"]))
    except MemoryError:
        env.clear()  # free what the program holds before building the reply
        return {"ok": False, "category": "memory", "error": "memory limit exceeded (MemoryError)"}
    except BaseException as e:  # the program's own failure, whatever it raised
        env.clear()
        return {"ok": False, "category": "runtime_error", "error": _describe(e)}
    if category is not None:
        return {"ok": False, "category": category, "error": error}
    return {"ok": True, "routes": routes}


def _preload(argv: list[str]) -> None:
    for arg in argv:
        if arg.startswith("--preload="):
            for name in filter(None, arg.split("=", 1)[1].split(",")):
                __import__(name)


def main() -> None:
    _preload(sys.argv[1:])
    isolation = _drop_privileges()
    isolation.update(confine.lock_down())  # irreversible; from here on no file, socket, process or signal
    msg = json.loads(sys.stdin.buffer.read())
    printed: list[str] = []
    try:
        result = _run(msg, printed)
    except MemoryError:
        result = {"ok": False, "category": "memory", "error": "memory limit exceeded (MemoryError)"}
    result["stdout"] = "".join(printed)[: int(msg.get("max_print_chars", 10_000))]
    result["isolation"] = isolation
    sys.stdout.buffer.write(json.dumps(result).encode("ascii"))
    sys.stdout.buffer.flush()
    os._exit(0)  # no atexit or finalisers: nothing of the program runs after its result is out


if __name__ == "__main__":
    main()
