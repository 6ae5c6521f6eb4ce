"""Validate and run LLM-written `plan(api)` programs (SED execution). The program is hostile input.

Layers, each assuming the others may fail:
1. `validate_program`: an AST allow-list (node types, attribute names), no names starting with `_`,
   no dangerous builtins by name, a fixed module shape (constants + one `def plan(api)`), 20 kB.
2. `sandbox_child.py` runs it with an allow-listed `__builtins__` (no `__import__`, no `open`).
3. The OS layer, which must hold on its own (with the real builtins, ctypes, any syscall), for a
   root parent and for an ordinary user's alike. Set up here, before exec: `python -I -S -B`,
   empty environment, fresh empty cwd, own session; rlimits on CPU, address space, file size (0),
   open files, core dumps; a new network namespace (no interfaces but a downed loopback; for an
   ordinary user inside a new user namespace). In the child, before it reads the program: uid/gid
   nobody when started as root; RLIMIT_NPROC=0; then `confine.lock_down()`: no_new_privs,
   Landlock with every filesystem right handled and none granted (no file is read, created,
   written or executed anywhere), TCP bind/connect denied, abstract unix sockets and signals
   scoped; seccomp denying sockets of every family, fork/clone/exec, ptrace and other-process
   memory, signals/rlimits/scheduling aimed at other processes, namespaces, io_uring, bpf.
   Wall clock and output size are enforced here, killing the whole process group.
   `sandbox_capabilities()` says which of these this kernel provides; a missing one is logged once
   (warning) and recorded in every result's `isolation["missing"]`.
4. `validate_routes`: edges exist and connect, start at the agent's edge, end at its destination.
5. Every text that leaves this module from the child (error, printed output, route-error keys and
   messages, isolation strings) goes through `text.safe_text`: valid UTF-8, no control
   characters, bounded in bytes. Valid routes hold only the snapshot's own agent and edge ids.

Execution rate (the paper's "programs that ran and produced valid routes / programs generated"):
a program counts as executed iff it ran to completion and EVERY agent of its subset got a valid
route (`SandboxResult.executed`). Valid routes of a partly failing program are still returned,
so a caller may use them and feed the failures back to the LLM.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import functools
import json
import logging
import os
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ReledError
from ..text import safe_text
from . import confine
from .navapi import PUBLIC_API, ROUTE_LEN_FACTOR

log = logging.getLogger(__name__)

CHILD = Path(__file__).with_name("sandbox_child.py")
MAX_SOURCE_BYTES = 20_000
MAX_STDERR_BYTES = 64_000
MAX_ERROR_BYTES = 2_000  # the result's error text
MAX_STDOUT_BYTES = 16_000  # what the program printed, as returned
MAX_ROUTE_ERROR_BYTES = 300  # one agent's route error (and its key: 200)
MAX_FOREIGN_ROUTE_ERRORS = 20  # route errors for keys that are no agent of the subset
NOFILE = 32  # stdin/out/err plus what the interpreter opens while importing
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
PR_SET_NO_NEW_PRIVS = 38


class ProgramRejected(ReledError):
    """The program failed validation. `category` is 'syntax' or 'rejected'; `reason` is short."""

    def __init__(self, reason: str, category: str = "rejected") -> None:
        super().__init__(reason)
        self.reason = reason
        self.category = category


class SandboxError(ReledError):
    """The sandbox itself could not run (child failed to start, malformed snapshot)."""


# ---- 1. static validation ------------------------------------------------------------------------

# Allow-list of AST node types. Left out on purpose: Import*, ClassDef, With, While (the loop rule:
# loops are `for` over finite data or a capped range), Global/Nonlocal, Async*/Await, Yield*,
# Match (class patterns), TryStar, MatMult. Lambda, comprehensions and try/except stay: they are
# what small models write, and reach nothing the rest of the rules do not already cover.
ALLOWED_NODES: frozenset[type[ast.AST]] = frozenset(
    {
        ast.Module, ast.FunctionDef, ast.arguments, ast.arg, ast.Return, ast.Assign, ast.AugAssign,
        ast.AnnAssign, ast.Delete, ast.For, ast.If, ast.Pass, ast.Break, ast.Continue, ast.Expr,
        ast.Try, ast.ExceptHandler, ast.Raise, ast.Assert,
        ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Lambda, ast.IfExp, ast.Dict, ast.Set, ast.ListComp,
        ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.comprehension, ast.Compare, ast.Call, ast.keyword,
        ast.FormattedValue, ast.JoinedStr, ast.Constant, ast.Attribute, ast.Subscript, ast.Starred,
        ast.Name, ast.List, ast.Tuple, ast.Slice, ast.NamedExpr,
        ast.Load, ast.Store, ast.Del,
        ast.And, ast.Or, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow,
        ast.LShift, ast.RShift, ast.BitOr, ast.BitXor, ast.BitAnd,
        ast.Invert, ast.Not, ast.UAdd, ast.USub,
        ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Is, ast.IsNot, ast.In, ast.NotIn,
    }
)  # fmt: skip


# Named even though the child's builtins lack most of them: rejecting early gives the LLM a clear reason.
def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


FORBIDDEN_NAMES = _words(
    "open exec eval compile getattr setattr delattr hasattr globals locals vars dir input breakpoint help "
    "memoryview type super object classmethod staticmethod property format id exit quit copyright credits "
    "license"
)

# Attribute names a program may use: the navigation API and plain container/string methods. An
# allow-list closes the non-underscore escapes (gi_frame/f_back/f_globals of generators, tb_frame,
# str.format field lookups, mro) without enumerating them.
SAFE_METHODS = _words(
    "append extend insert pop remove index count sort reverse copy clear get items keys values setdefault update "
    "popitem add discard union intersection difference symmetric_difference issubset issuperset isdisjoint "
    "join split rsplit strip lstrip rstrip startswith endswith lower upper replace find rfind partition rpartition "
    "isdigit isalpha isalnum is_integer args"
)
ALLOWED_ATTRS = frozenset(PUBLIC_API) | SAFE_METHODS


_NODE_NAMES: dict[type[ast.AST], str] = {
    ast.Import: "imports are not allowed",
    ast.ImportFrom: "imports are not allowed",
    ast.While: "while loops are not allowed (the loop rule: use for loops over api results or a range)",
    ast.ClassDef: "class definitions are not allowed",
    ast.With: "with statements are not allowed",
    ast.Global: "global statements are not allowed",
    ast.Nonlocal: "nonlocal statements are not allowed",
    ast.AsyncFunctionDef: "async functions are not allowed",
    ast.Await: "await is not allowed",
    ast.Yield: "yield is not allowed",
    ast.YieldFrom: "yield is not allowed",
}


def _const_expr(node: ast.AST) -> bool:
    """A literal: what a top-level assignment may hold."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        return _const_expr(node.operand)
    if isinstance(node, ast.List | ast.Tuple | ast.Set):
        return all(_const_expr(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(k is not None and _const_expr(k) for k in node.keys) and all(_const_expr(v) for v in node.values)
    return False


def _where(node: ast.AST) -> str:
    line = getattr(node, "lineno", None)
    return f" (line {line})" if line is not None else ""


def _check_name(name: str | None, node: ast.AST) -> None:
    if name is None:
        return
    if name.startswith("_"):
        raise ProgramRejected(f"names starting with '_' are not allowed: {name!r}{_where(node)}")
    if name in FORBIDDEN_NAMES:
        raise ProgramRejected(f"{name!r} is not allowed{_where(node)}")


def validate_program(source: str) -> ast.Module:
    """Parse and check `source`; raises ProgramRejected (category 'syntax' or 'rejected')."""
    if not isinstance(source, str):
        raise ProgramRejected(f"the program must be a string, not {type(source).__name__}")
    size = len(source.encode("utf-8", "surrogatepass"))
    if size > MAX_SOURCE_BYTES:
        raise ProgramRejected(f"program too long: {size} bytes > {MAX_SOURCE_BYTES}")
    try:
        tree = ast.parse(source, "<plan>", "exec")
    except SyntaxError as e:
        raise ProgramRejected(f"syntax error at line {e.lineno}: {e.msg}", "syntax") from None
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes, absurd nesting
        raise ProgramRejected(f"unparsable program: {type(e).__name__}", "syntax") from None

    for node in ast.walk(tree):  # iterative: a deep tree cannot exhaust the stack here
        if type(node) not in ALLOWED_NODES:
            what = _NODE_NAMES.get(type(node), f"{type(node).__name__} is not allowed")
            raise ProgramRejected(f"{what}{_where(node)}")
        if isinstance(node, ast.Name):
            _check_name(node.id, node)
        elif isinstance(node, ast.Attribute):
            _check_name(node.attr, node)
            if node.attr not in ALLOWED_ATTRS:
                raise ProgramRejected(f"attribute .{node.attr} is not allowed{_where(node)}")
            if not isinstance(node.ctx, ast.Load):
                raise ProgramRejected(f"assigning or deleting attributes is not allowed{_where(node)}")
        elif isinstance(node, ast.FunctionDef):
            _check_name(node.name, node)
            if node.decorator_list:
                raise ProgramRejected(f"decorators are not allowed{_where(node)}")
        elif isinstance(node, ast.arg | ast.keyword):
            _check_name(node.arg, node)
        elif isinstance(node, ast.ExceptHandler):
            _check_name(node.name, node)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "__" in node.value:
            # defence in depth: no dunder keys even if some mapping ever exposed them
            raise ProgramRejected(f"string constants containing '__' are not allowed{_where(node)}")

    plans = 0
    for i, stmt in enumerate(tree.body):
        if i == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # docstring
        if isinstance(stmt, ast.FunctionDef):
            if stmt.name != "plan":
                raise ProgramRejected(
                    f"only one top-level function, plan(api), is allowed (found {stmt.name!r}; "
                    f"define helpers inside plan){_where(stmt)}"
                )
            a = stmt.args
            if len(a.posonlyargs) + len(a.args) != 1 or a.vararg or a.kwarg or a.kwonlyargs or a.defaults:
                raise ProgramRejected(f"plan must take exactly one argument: def plan(api){_where(stmt)}")
            plans += 1
        elif isinstance(stmt, ast.Assign):
            try:
                const = _const_expr(stmt.value)
            except RecursionError:  # `X = ------...1`: parses, but too deep to be a sane constant
                const = False
            if not all(isinstance(t, ast.Name) for t in stmt.targets) or not const:
                raise ProgramRejected(
                    f"top-level statements other than constant assignments are not allowed{_where(stmt)}"
                )
        else:
            raise ProgramRejected(
                f"top-level {type(stmt).__name__} is not allowed (put code inside plan){_where(stmt)}"
            )
    if plans != 1:
        raise ProgramRejected("the program must define plan(api) exactly once" if plans else "no plan(api) function")
    return tree


# ---- snapshots -------------------------------------------------------------------------------------


def snapshot_from(graph: Any, agents: Iterable[Mapping[str, Any]], congestion: Mapping[Any, Any] | None = None) -> dict:
    """The read-only, JSON-serialisable view a program gets (see navapi's module doc).

    `graph` is a RoadGraph. Each agent is a mapping {"id", "edge", "dest", optional "xy"}; edge and
    dest are edge indices or ids. `edge` is where its route must start: in NavigationEnv, the agent's
    last planned edge `plan[-1]` (dest is `trip.dest`, xy from its position). `congestion` maps an
    edge (index or id) to (occupancy in [0, 1], live mean speed m/s); other edges are free flowing.
    """
    n = graph.n_edges
    ids = list(graph.edge_ids)

    def idx(e: Any) -> int:
        if isinstance(e, str):
            if e not in graph.index:
                raise SandboxError(f"unknown edge {e!r}")
            return graph.index[e]
        i = int(e)
        if not 0 <= i < n:
            raise SandboxError(f"edge index {i} out of range (0..{n - 1})")
        return i

    occupancy = [0.0] * n
    live = [float(v) for v in graph.speed]
    for e, (occ, spd) in (congestion or {}).items():
        i = idx(e)
        occupancy[i] = min(max(float(occ), 0.0), 1.0)
        live[i] = max(float(spd), 0.0)
    edges = [
        {
            "id": ids[i],
            "length": float(graph.length[i]),
            "speed_limit": float(graph.speed[i]),
            "lanes": int(graph.lanes[i]),
            "start_xy": [float(graph.start_xy[i, 0]), float(graph.start_xy[i, 1])],
            "end_xy": [float(graph.end_xy[i, 0]), float(graph.end_xy[i, 1])],
            "name": graph.names[i],
        }
        for i in range(n)
    ]
    succ = [[int(j) for j in graph.successors(i)] for i in range(n)]
    out_agents = []
    for a in agents:
        e, d = idx(a["edge"]), idx(a["dest"])
        xy = a.get("xy")
        if xy is None:
            xy = (float(graph.start_xy[e, 0]), float(graph.start_xy[e, 1]))
        out_agents.append({"id": str(a["id"]), "edge": ids[e], "dest": ids[d], "xy": [float(xy[0]), float(xy[1])]})
    if len({a["id"] for a in out_agents}) != len(out_agents):
        raise SandboxError("agent ids in a snapshot must be unique")
    return {"edges": edges, "successors": succ, "occupancy": occupancy, "live_speed": live, "agents": out_agents}


# ---- 4. route validation ---------------------------------------------------------------------------


def validate_routes(
    routes: Mapping[str, Any], snapshot: Mapping[str, Any]
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(valid routes, error per agent). Every agent of the snapshot needs a route that starts at its
    current edge, enters only existing successors, ends at its destination and has at most
    ROUTE_LEN_FACTOR * |edges| entries; routes for agents outside the snapshot are errors too."""
    ids = [e["id"] for e in snapshot["edges"]]
    index = {e: i for i, e in enumerate(ids)}
    succ = [set(s) for s in snapshot["successors"]]
    agents = {a["id"]: a for a in snapshot["agents"]}
    cap = ROUTE_LEN_FACTOR * max(len(ids), 1)
    ok: dict[str, list[str]] = {}
    errors: dict[str, str] = {a: "no route for this agent" for a in agents if a not in routes}
    for a, route in routes.items():
        err = _route_error(a, route, agents, index, succ, cap)
        if err is None:
            ok[a] = list(route)
        else:
            errors[str(a)] = err
    return ok, errors


def _route_error(a: Any, route: Any, agents: dict, index: dict[str, int], succ: list[set[int]], cap: int) -> str | None:
    if a not in agents:
        return "not an agent of this subset"
    if not isinstance(route, list | tuple) or not route or not all(isinstance(e, str) for e in route):
        return "the route must be a non-empty list of edge ids"
    if len(route) > cap:
        return f"route of {len(route)} edges is longer than the cap of {cap}"
    for e in route:
        if e not in index:
            return f"unknown edge {e[:80]!r}"
    start, dest = agents[a]["edge"], agents[a]["dest"]
    if route[0] != start:
        return f"starts at {route[0]!r}, not at the agent's current edge {start!r}"
    for k in range(len(route) - 1):
        if index[route[k + 1]] not in succ[index[route[k]]]:
            return f"{route[k]!r} -> {route[k + 1]!r} (step {k + 1}) is not a connection"
    if route[-1] != dest:
        hint = " (no move_* call for this agent?)" if len(route) == 1 else ""
        return f"ends at {route[-1]!r}, not at the destination {dest!r}{hint}"
    return None


# ---- 2./3. running -------------------------------------------------------------------------------


@dataclass
class SandboxResult:
    """routes: the valid routes (None when the program did not complete); reason: None on full
    success, else 'rejected' | 'syntax' | 'timeout' | 'memory' | 'crash' | 'runtime_error' |
    'output_too_large' | 'invalid_route'; route_errors: per-agent errors for 'invalid_route';
    stdout: what the program print()ed (captured, capped); isolation: what the child reported."""

    routes: dict[str, list[str]] | None
    error: str | None
    reason: str | None
    wall_s: float
    cpu_s: float | None = None
    route_errors: dict[str, str] = field(default_factory=dict)
    stdout: str = ""
    isolation: dict[str, Any] = field(default_factory=dict)

    @property
    def executed(self) -> bool:
        """Counts towards the execution rate: ran, and every agent of the subset got a valid route."""
        return self.reason is None


def execution_rate(results: Iterable[SandboxResult]) -> float:
    """Programs executed / programs generated (0 for none)."""
    results = list(results)
    return sum(r.executed for r in results) / len(results) if results else 0.0


def _load_libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()  # resolved in the parent: the preexec_fn runs between fork and exec


def _preexec(cpu_s: int, mem_bytes: int, require_netns: bool = False) -> Callable[[], None]:
    unshare = getattr(_LIBC, "unshare", None)
    prctl = getattr(_LIBC, "prctl", None)
    as_root = os.geteuid() == 0

    def apply() -> None:
        # only syscalls through pre-resolved functions: the parent may have threads (libsumo, torch)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # SIGXCPU, then SIGKILL a second later
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
        # a namespace with only a downed loopback; best effort, the child reports what it got
        made = unshare is not None and unshare(CLONE_NEWNET) == 0
        if not made and unshare is not None and not as_root:
            made = unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0  # unprivileged user namespaces, where enabled
        if require_netns and not made:  # only the capability probe: fail the exec
            raise OSError("no network namespace")
        if prctl is not None:
            prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid binaries even if exec were reached

    return apply


def _parent_netns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return None


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group. Only while the child is unreaped (alive or a zombie), so its
    pid, which is also the group id, cannot have been reused. Not proc.kill(): that may reap it."""
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session: take the whole group
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)


def _exchange(proc: subprocess.Popen, data: bytes, deadline: float, max_out: int) -> tuple[bytes, bytes, str | None]:
    """Write `data` to the child's stdin and read its stdout/stderr with caps, until both close or
    `deadline`. Returns (stdout, stderr, 'timeout' | 'output_too_large' | None); kills on either."""
    assert proc.stdin and proc.stdout and proc.stderr
    sel = selectors.DefaultSelector()
    bufs: dict[int, bytearray] = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    caps = {proc.stdout.fileno(): max_out, proc.stderr.fileno(): MAX_STDERR_BYTES}
    for f in (proc.stdin, proc.stdout, proc.stderr):
        os.set_blocking(f.fileno(), False)
    sel.register(proc.stdout, selectors.EVENT_READ)
    sel.register(proc.stderr, selectors.EVENT_READ)
    view, off = memoryview(data), 0
    if data:
        sel.register(proc.stdin, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    status = None
    try:
        while len(sel.get_map()) and status is None:
            left = deadline - time.monotonic()
            if left <= 0:
                status = "timeout"
                break
            for key, _ in sel.select(left):
                fd = key.fd
                if key.fileobj is proc.stdin:
                    try:
                        off += os.write(fd, view[off : off + 65536])
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the child died before reading everything
                        off = len(data)
                    if off >= len(data):
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                bufs[fd] += chunk
                if len(bufs[fd]) > caps[fd]:
                    status = "output_too_large"
                    break
    finally:
        sel.close()
        if status is not None:
            _kill(proc)
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), status


def _reap(proc: subprocess.Popen, deadline: float) -> tuple[int, float | None]:
    """Wait for the child, killing it at `deadline`; (exit code, CPU seconds it used)."""
    if proc.returncode is not None:
        return proc.returncode, None
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            _kill(proc)
            deadline = float("inf")  # SIGKILL cannot be ignored: it ends soon
        time.sleep(0.002)
    _kill(proc)  # it has exited but is not reaped yet: clear anything left in its group, then reap
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, ru.ru_utime + ru.ru_stime


def run_program(
    source: str,
    snapshot: Mapping[str, Any],
    *,
    cpu_s: int = 2,
    wall_s: float = 5.0,
    mem_mb: int = 256,
    max_output_bytes: int = 1_000_000,
) -> SandboxResult:
    """Validate `source`, run its plan(api) in a locked-down child against `snapshot`, validate
    the routes. Never raises for anything the program does; see SandboxResult for the outcomes."""
    t0 = time.monotonic()
    try:
        validate_program(source)
    except ProgramRejected as e:
        return SandboxResult(None, e.reason, e.category, time.monotonic() - t0)
    return _execute(source, snapshot, cpu_s=cpu_s, wall_s=wall_s, mem_mb=mem_mb, max_output_bytes=max_output_bytes)


def _run_unvalidated(
    source: str, snapshot: Mapping[str, Any], *, preload: Iterable[str] = (), **limits: Any
) -> SandboxResult:
    """TEST HOOK: run `source` with the real builtins and no AST validation, to check that the OS
    layer alone (rlimits, namespaces, uid, Landlock, seccomp) contains code that got past the other
    layers. `preload`: modules (e.g. socket, subprocess, ctypes) the child imports before its
    lockdown, so the program has them even though it can no longer read their files."""
    names = [str(n) for n in preload]
    if not all(n.replace(".", "").replace("_", "").isalnum() for n in names):
        raise ValueError(f"bad module names {names!r}")
    return _execute(source, snapshot, trusted_test=True, preload=tuple(names), **limits)


_REQUIRED = ("landlock_fs", "landlock_tcp", "landlock_scope", "seccomp", "netns")


def sandbox_capabilities() -> dict[str, Any]:
    """What this kernel and process provide to the OS layer (cached; costs one short child process).

    Keys: landlock_abi (0 = none), landlock_fs (files), landlock_tcp (ABI >= 4), landlock_scope
    (abstract unix sockets and signals, ABI >= 6), seccomp (kernel filter + libseccomp), netns (a
    network namespace can be made, through a user namespace for an ordinary user), uid_drop (the
    parent is root, so the child becomes nobody), and missing: the names of those that are False
    (uid_drop is not listed: an ordinary user's child keeps that user's uid by design)."""
    caps = dict(_probe_capabilities())  # a copy: callers may not edit the cached one
    caps["missing"] = list(caps["missing"])
    return caps


@functools.cache
def _probe_capabilities() -> dict[str, Any]:
    caps: dict[str, Any] = dict(confine.probe())
    caps["netns"] = _can_make_netns()
    caps["uid_drop"] = os.geteuid() == 0
    caps["missing"] = [k for k in _REQUIRED if not caps[k]]
    return caps


def _can_make_netns() -> bool:
    """Start a no-op child with the sandbox's preexec, failing when no network namespace was made."""
    try:
        rc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", "pass"],
            preexec_fn=_preexec(1, 1 << 30, require_netns=True),
            env={},
            timeout=10,
        ).returncode
    except (OSError, subprocess.SubprocessError):
        return False
    return rc == 0


@functools.cache
def report_sandbox_capabilities() -> None:
    caps = sandbox_capabilities()
    holds = [k for k in _REQUIRED if caps[k]] + (["uid_drop"] if caps["uid_drop"] else [])
    if caps["missing"]:
        log.warning(
            "sandbox OS layer: this kernel lacks %s (Landlock ABI %d); holding: %s. The AST layer and the "
            "remaining OS mechanisms stand alone for what is missing.",
            ", ".join(caps["missing"]),
            caps["landlock_abi"],
            ", ".join(holds),
        )
    else:
        log.info("sandbox OS layer: %s (Landlock ABI %d)", ", ".join(holds), caps["landlock_abi"])


def _execute(
    source: str,
    snapshot: Mapping[str, Any],
    *,
    cpu_s: int = 2,
    wall_s: float = 5.0,
    mem_mb: int = 256,
    max_output_bytes: int = 1_000_000,
    trusted_test: bool = False,
    preload: tuple[str, ...] = (),
) -> SandboxResult:
    report_sandbox_capabilities()
    t0 = time.monotonic()
    msg = {
        "source": source,
        "snapshot": snapshot,
        "max_output_bytes": max_output_bytes,
        "max_print_chars": 10_000,
        "trusted_test": trusted_test,
    }
    data = json.dumps(msg).encode("ascii")
    cpu_limit = max(int(cpu_s), 1)  # RLIMIT_CPU counts whole seconds
    with tempfile.TemporaryDirectory(
        prefix="reled_sandbox_"
    ) as cwd:  # mode 0700: the child, once nobody, cannot even list it
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", str(CHILD)]
                + ([f"--preload={','.join(preload)}"] if preload else []),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                close_fds=True,
                cwd=cwd,
                env={},
                start_new_session=True,
                preexec_fn=_preexec(cpu_limit, int(mem_mb) << 20),
            )
        except OSError as e:
            raise SandboxError(f"could not start the sandbox child {CHILD}: {e}") from e
        try:
            deadline = t0 + wall_s
            out, err, status = _exchange(proc, data, deadline, max_output_bytes)
            rc, cpu = _reap(proc, deadline)
        finally:
            _reap(proc, 0.0)  # on an exception above: kill and reap; otherwise a no-op
            for f in (proc.stdin, proc.stdout, proc.stderr):
                with contextlib.suppress(OSError):
                    f.close()  # type: ignore[union-attr]
    wall = time.monotonic() - t0

    def fail(reason: str, error: str, **kw: Any) -> SandboxResult:
        return SandboxResult(None, safe_text(error, MAX_ERROR_BYTES), reason, wall, cpu, **kw)

    if status == "timeout":
        return fail("timeout", f"wall-clock limit of {wall_s:g} s exceeded")
    if status == "output_too_large":
        return fail("output_too_large", f"output exceeded {max_output_bytes} bytes")
    # SIGXCPU is RLIMIT_CPU's (a program that raises it on itself only earns a 'timeout'); the hard
    # limit's SIGKILL a second later is told apart from a wall-clock kill by the CPU it used
    if rc == -signal.SIGXCPU or (rc == -signal.SIGKILL and cpu is not None and cpu >= cpu_limit - 0.05):
        return fail("timeout", f"CPU limit of {cpu_limit} s exceeded")
    tail = err[-2000:].decode("utf-8", "replace")
    try:
        res = json.loads(out) if out else None
    except (ValueError, RecursionError):  # a compromised child may send anything
        res = None
    if not isinstance(res, dict):
        if b"MemoryError" in err:
            return fail("memory", f"memory limit of {mem_mb} MB exceeded")
        return fail("crash", f"the sandbox child exited with status {rc} and no result: {tail.strip()[-500:]}")
    iso = _isolation(res.get("isolation"))
    stdout = safe_text(_text(res.get("stdout", "")), MAX_STDOUT_BYTES)
    if not res.get("ok"):
        category = res.get("category")
        if category not in _CHILD_CATEGORIES:  # a compromised child does not get to invent outcomes
            category = "crash"
        if category == "memory":
            return fail(category, f"memory limit of {mem_mb} MB exceeded", stdout=stdout, isolation=iso)
        return fail(category, _text(res.get("error", "")), stdout=stdout, isolation=iso)
    routes = res.get("routes")
    if not isinstance(routes, dict):
        return fail("crash", "the sandbox child returned no routes", stdout=stdout, isolation=iso)
    ok, errors = validate_routes(routes, snapshot)
    if errors:
        errors = _safe_route_errors(errors, snapshot)
        shown = "; ".join(f"agent {a}: {m}" for a, m in list(errors.items())[:10])
        more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
        error = safe_text(f"invalid routes: {shown}{more}", MAX_ERROR_BYTES)
        return SandboxResult(ok, error, "invalid_route", wall, cpu, errors, stdout, iso)
    return SandboxResult(ok, None, None, wall, cpu, {}, stdout, iso)


def _text(value: Any) -> str:
    """A child's value as text, cut before it is cleaned (safe_text of 1 MB would cost for nothing)."""
    return value[: 4 * MAX_STDOUT_BYTES] if isinstance(value, str) else str(type(value).__name__)


def _safe_route_errors(errors: Mapping[str, str], snapshot: Mapping[str, Any]) -> dict[str, str]:
    """Route errors with clean, bounded keys and messages. Keys of the subset's agents are kept as
    they are (they are the caller's ids); keys the child made up are cleaned and at most
    MAX_FOREIGN_ROUTE_ERRORS of them kept, the rest counted under one entry."""
    agents = {a["id"] for a in snapshot["agents"]}
    out: dict[str, str] = {}
    foreign = 0
    for a, m in errors.items():
        if a not in agents:
            foreign += 1
            if foreign > MAX_FOREIGN_ROUTE_ERRORS:
                continue
            a = safe_text(a[:400], 200)
        out[a] = safe_text(m[: 4 * MAX_ROUTE_ERROR_BYTES], MAX_ROUTE_ERROR_BYTES)
    if foreign > MAX_FOREIGN_ROUTE_ERRORS:
        out["(more)"] = f"{foreign - MAX_FOREIGN_ROUTE_ERRORS} more routes for keys that are not agents of this subset"
    return out


_CHILD_CATEGORIES = ("syntax", "rejected", "memory", "runtime_error", "output_too_large")


def _isolation(info: Any) -> dict[str, Any]:
    """What the child reported, summarised: new network namespace, unprivileged uid, fork limit,
    no_new_privs, Landlock (and its ABI), seccomp; `missing` names what did not hold. The child
    collects it before the program runs but sends it with the result, so a program past every
    layer could fake it: it describes the set-up, the tests check the effects."""
    if not isinstance(info, dict):
        return {}
    parent_ns = _parent_netns()
    abi = info.get("landlock_abi")
    abi = abi if isinstance(abi, int) else 0
    out: dict[str, Any] = {
        "netns": info.get("netns") is not None and info.get("netns") != parent_ns,
        "uid": info.get("uid") if isinstance(info.get("uid"), int) else None,
        "unprivileged": info.get("uid") != 0 and info.get("euid") != 0,
        "no_fork": info.get("nproc") == 0,
        "no_new_privs": info.get("no_new_privs") is True,
        "landlock": info.get("landlock") is True,
        "landlock_abi": abi,
        "seccomp": info.get("seccomp") is True,
    }
    out["landlock_tcp"] = out["landlock"] and abi >= 4
    out["landlock_scope"] = out["landlock"] and abi >= 6
    ifaces = info.get("net_interfaces")
    if isinstance(ifaces, list):
        out["net_interfaces"] = [safe_text(str(i), 64) for i in ifaces[:16]]
    names = ("netns", "no_fork", "no_new_privs", "landlock", "landlock_tcp", "landlock_scope", "seccomp")
    out["missing"] = [k for k in names if not out[k]]
    for k in ("setuid_error", "nproc_error", "landlock_error", "seccomp_error"):
        if k in info:
            out[k] = safe_text(str(info[k])[:1000], 300)
    return out
