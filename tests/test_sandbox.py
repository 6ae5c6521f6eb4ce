"""SED execution: the navigation API, the program validator and the locked-down child process.

Hostile programs must come back as a SandboxResult with the right reason, quickly, never as an
exception or a stall in the caller. `_run_unvalidated` skips the AST layer (and gives the real
builtins) to check that the OS layer alone contains code that got past it.
"""

from __future__ import annotations

import ast
import ctypes
import dataclasses
import os
import tempfile
import time

import numpy as np
import pytest

from reled_hpc.errors import ReledError
from reled_hpc.expert.navapi import MIN_WEIGHT, NavAPI, NavError
from reled_hpc.expert.sandbox import (
    ProgramRejected,
    _run_unvalidated,
    execution_rate,
    run_program,
    sandbox_capabilities,
    snapshot_from,
    validate_program,
    validate_routes,
)
from reled_hpc.text import is_safe, safe_text

GOOD = """
def plan(api):
    for a in api.agents():
        api.move_to_by_shortest_path(a, api.destination(a))
"""


@pytest.fixture(scope="module")
def snap(grid):
    g = grid.graph
    rng = np.random.default_rng(7)
    agents = []
    while len(agents) < 6:  # trips of a few edges, the destination not next door
        o, d = (int(x) for x in rng.choice(g.n_edges, size=2, replace=False))
        if len(g.route(o, d)) >= 4:
            agents.append({"id": f"veh{len(agents)}", "edge": o, "dest": d})
    return snapshot_from(g, agents)


def _cost(g, route_ids: list[str]) -> float:
    return sum(max(float(g.length[g.index[e]]), MIN_WEIGHT) for e in route_ids[1:])


def _run(src: str, snap, **kw):
    t0 = time.monotonic()
    res = run_program(src, snap, **kw)
    assert time.monotonic() - t0 < kw.get("wall_s", 5.0) + 1.0
    return res


# ---- the API, in process ------------------------------------------------------------------------


def test_navapi_shortest_and_fastest_match_roadgraph(grid):
    g = grid.graph
    slow = {g.edge_ids[i]: (0.9, 0.5) for i in range(0, g.n_edges, 3)}  # every third edge jammed
    snap = snapshot_from(g, [], slow)
    api = NavAPI(snap)
    tt = np.maximum(g.length / np.maximum(np.array(snap["live_speed"]), 1.0), MIN_WEIGHT)
    rng = np.random.default_rng(3)
    for _ in range(40):
        o, d = (int(x) for x in rng.choice(g.n_edges, size=2, replace=False))
        sp = api.shortest_path(g.edge_ids[o], g.edge_ids[d])
        assert sp[0] == g.edge_ids[o] and sp[-1] == g.edge_ids[d]
        assert abs(_cost(g, sp) - g.cost_to(d)[o]) < 1e-6
        fp = api.fastest_path(g.edge_ids[o], g.edge_ids[d])
        assert abs(api.path_time(fp) - g.cost_to(d, tt)[o]) < 1e-6
    e = g.edge_ids[0]
    assert api.congestion(e) == 0.9 and api.speed(e) == 0.5 and api.speed_limit(e) == float(g.speed[0])
    assert api.successors(e) == [g.edge_ids[j] for j in g.successors(0)]
    assert e in api.edges_near(api.edge_xy(e)[0], 1.0)
    with pytest.raises(NavError, match="unknown edge"):
        api.length("no-such-edge")


# ---- programs that should work ------------------------------------------------------------------


def test_correct_program_routes_every_agent_on_shortest_paths(grid, snap):
    res = _run(GOOD, snap)
    assert res.executed and res.reason is None and res.error is None, res.error
    g = grid.graph
    assert set(res.routes) == {a["id"] for a in snap["agents"]}
    for a in snap["agents"]:
        route = res.routes[a["id"]]
        o, d = g.index[a["edge"]], g.index[a["dest"]]
        assert route[0] == a["edge"] and route[-1] == a["dest"]
        assert abs(_cost(g, route) - _cost(g, [g.edge_ids[i] for i in g.route(o, d)])) < 1e-6
    assert execution_rate([res, _run("X = 1", snap)]) == 0.5


def test_module_level_function_style_and_print_capture(snap):
    src = """
def plan(api):
    for a in agents():
        move_to_by_shortest_path(a, destination(a))
        print("routed", a, len(route(a)))
"""
    res = _run(src, snap)
    assert res.executed, res.error
    assert res.stdout.count("routed") == len(snap["agents"])


def test_move_via_and_avoid(grid, snap):
    g = grid.graph
    a0 = snap["agents"][0]
    base = [g.edge_ids[i] for i in g.route(g.index[a0["edge"]], g.index[a0["dest"]])]
    waypoint = next(e for e in g.edge_ids if e not in base)
    src = f"""
def plan(api):
    for a in api.agents():
        if a == {a0["id"]!r}:
            api.move_via(a, [{waypoint!r}])
            assert api.route(a)[-1] == {waypoint!r}
            api.move_to_by_shortest_path(a, api.destination(a))
            continue
        sp = api.shortest_path(api.position(a), api.destination(a))
        try:
            api.avoid(a, [sp[1]])
        except NavError:
            print("bottleneck", a)  # its only way on: avoiding it would strand the agent
            sp = []
        api.move_to_by_shortest_path(a, api.destination(a))
        if sp:
            print("avoided", a)
            assert sp[1] not in api.route(a)
            assert api.path_length(api.route(a)) >= api.path_length(sp)  # grids have equal detours
"""
    res = _run(src, snap)
    assert res.executed, res.error
    assert "avoided" in res.stdout
    assert waypoint in res.routes[a0["id"]]
    assert _cost(g, res.routes[a0["id"]]) > _cost(g, base)


def test_avoid_that_disconnects_raises_naverror(snap):
    catch = """
def plan(api):
    for a in api.agents():
        try:
            api.avoid(a, api.successors(api.position(a)))
        except NavError as e:
            print("refused:", e)
        move_to_by_fastest_path(a, destination(a))
"""
    res = _run(catch, snap)
    assert res.executed, res.error
    assert "refused" in res.stdout and "unreachable" in res.stdout
    res = _run(
        "def plan(api):\n    for a in api.agents():\n        api.avoid(a, api.successors(api.position(a)))\n", snap
    )
    assert res.reason == "runtime_error" and "NavError" in res.error and "line 3" in res.error


def test_returned_dict_wins_per_agent(snap):
    a0, a1 = snap["agents"][0]["id"], snap["agents"][1]["id"]
    src = f"""
def plan(api):
    for a in api.agents():
        api.move_to_by_shortest_path(a, api.destination(a))
    return {{{a0!r}: api.fastest_path(api.position({a0!r}), api.destination({a0!r})), {a1!r}: [api.position({a1!r})]}}
"""
    res = _run(src, snap)
    assert res.reason == "invalid_route"
    assert set(res.route_errors) == {a1} and "destination" in res.route_errors[a1]
    assert a0 in res.routes and len(res.routes) == len(snap["agents"]) - 1


# ---- invalid routes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        ("return {a: [api.position(a), 'no-such-edge', api.destination(a)] for a in api.agents()}", "unknown edge"),
        ("return {a: [api.position(a), api.destination(a)] for a in api.agents()}", "not a connection"),
        (
            "return {a: api.shortest_path(api.successors(api.position(a))[0], api.destination(a)) "
            "for a in api.agents()}",
            "not at the agent's current edge",
        ),
        ("return {a: [api.position(a)] for a in api.agents()}", "not at the destination"),
    ],
)
def test_invalid_routes_name_the_agent(snap, body, expect):
    res = _run(f"def plan(api):\n    {body}\n", snap)
    assert res.reason == "invalid_route" and not res.executed
    assert set(res.route_errors) == {a["id"] for a in snap["agents"]}
    assert all(expect in m for m in res.route_errors.values()), res.route_errors
    assert snap["agents"][0]["id"] in res.error


def test_missing_and_foreign_agents(snap):
    first = snap["agents"][0]["id"]
    res = _run(f"def plan(api):\n    move_to_by_shortest_path({first!r}, destination({first!r}))\n", snap)
    assert res.reason == "invalid_route" and list(res.routes) == [first]
    assert all("no move_*" in m for m in res.route_errors.values())
    ok, errors = validate_routes({"stranger": ["A0A1"]}, snap)
    assert ok == {} and errors["stranger"] == "not an agent of this subset"


# ---- rejected by the validator ----------------------------------------------------------------------

HOSTILE = {
    "import": "import os\ndef plan(api):\n    pass\n",
    "import_inside": "def plan(api):\n    import os\n    os.system('id')\n",
    "dunder_import": "def plan(api):\n    __import__('os')\n",
    "subclasses": "def plan(api):\n    return ().__class__.__bases__[0].__subclasses__()\n",
    "globals": "def plan(api):\n    return plan.__globals__\n",
    "getattr": "def plan(api):\n    return getattr(api, '__dict__')\n",
    "open": "def plan(api):\n    return open('/etc/passwd').read()\n",
    "exec": "def plan(api):\n    exec('1')\n",
    "eval": "def plan(api):\n    return eval('1')\n",
    "frame_walk": "def plan(api):\n    g = (x for x in [1])\n    return g.gi_frame.f_back.f_globals\n",
    "format_lookup": "def plan(api):\n    return '{0.gi_frame}'.format(api)\n",
    "dunder_string": "def plan(api):\n    return {}['__builtins__']\n",
    "while": "def plan(api):\n    while True:\n        pass\n",
    "class": "class A:\n    pass\ndef plan(api):\n    pass\n",
    "with": "def plan(api):\n    with api:\n        pass\n",
    "global": "def plan(api):\n    global X\n",
    "yield": "def plan(api):\n    yield 1\n",
    "decorator": "def plan(api):\n    @api.agents\n    def f():\n        pass\n",
    "attr_store": "def plan(api):\n    api.agents = None\n",
    "type": "def plan(api):\n    return type(api)\n",
    "no_plan": "X = 1\n",
    "two_functions": "def helper():\n    pass\ndef plan(api):\n    pass\n",
    "two_plans": "def plan(api):\n    pass\ndef plan(api):\n    pass\n",
    "plan_args": "def plan(api, x):\n    pass\n",
    "top_level_code": "def plan(api):\n    pass\nplan(None)\n",
    "too_long": "X = '" + "a" * 30_000 + "'\ndef plan(api):\n    pass\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_programs_are_rejected(snap, name):
    res = _run(HOSTILE[name], snap)
    assert res.reason == "rejected" and res.routes is None, (res.reason, res.error)
    assert res.error and len(res.error) < 300
    assert res.wall_s < 0.5  # rejected statically: no child process
    with pytest.raises(ProgramRejected) as info:
        validate_program(HOSTILE[name])
    assert isinstance(info.value, ReledError) and info.value.reason == res.error


def test_syntax_error_reports_the_line(snap):
    res = _run("def plan(api):\n    x = 1\n    y = (\n", snap)
    assert res.reason == "syntax" and "line 3" in res.error
    assert _run("def plan(api):\n  return 1\n\x00", snap).reason == "syntax"
    assert _run("def plan(api):\n    return " + "-" * 50_000 + "1\n", snap).reason == "rejected"  # too long


# ---- contained at run time ---------------------------------------------------------------------------


def test_cpu_bound_program_times_out(snap):
    src = "def plan(api):\n    for i in range(10**6):\n        for j in range(10**6):\n            pass\n"
    res = _run(src, snap, cpu_s=1, wall_s=4)
    assert res.reason == "timeout" and "CPU" in res.error
    res = _run("def plan(api):\n    for i in range(10**12):\n        pass\n", snap)
    assert res.reason == "runtime_error" and "range" in res.error


def test_infinite_loop_past_the_validator_is_killed(snap):
    res = _run_unvalidated("def plan(api):\n    while True:\n        pass\n", snap, cpu_s=1, wall_s=4)
    assert res.reason == "timeout" and res.wall_s < 5
    res = _run_unvalidated("import time\ndef plan(api):\n    time.sleep(60)\n", snap, wall_s=1.5)
    assert res.reason == "timeout" and "wall-clock" in res.error and res.wall_s < 2.5


@pytest.mark.parametrize("bomb", ["x = [0] * 10**10", "x = 'a' * 10**10", "x = [[0] * 10**6 for i in range(1000)]"])
def test_memory_bombs(snap, bomb):
    res = _run(f"def plan(api):\n    {bomb}\n    return {{}}\n", snap)
    assert res.reason == "memory", (res.reason, res.error)


def test_huge_output(snap):
    res = _run("def plan(api):\n    return {a: ['e'] * 10**6 for a in api.agents()}\n", snap)
    assert res.reason == "output_too_large"
    # a child that writes to its stdout directly is cut off by the parent, not buffered
    src = "import sys\ndef plan(api):\n    for i in range(1000):\n        sys.stdout.write('x' * 10**6)\n"
    res = _run_unvalidated(src, snap, max_output_bytes=100_000)
    assert res.reason == "output_too_large" and res.wall_s < 3


def _probe(snap, body: str, preload: tuple[str, ...] = ()) -> str:
    """Run `body` in the child without the AST layer; it reports through the error message."""
    res = _run_unvalidated("import os, resource\ndef plan(api):\n" + body, snap, preload=preload)
    assert res.reason == "runtime_error", (res.reason, res.error)
    return res.error


def test_os_layer_blocks_fork_write_and_privileges(snap):
    err = _probe(snap, "    os.fork()\n")
    assert "PermissionError" in err  # seccomp (EPERM); RLIMIT_NPROC (EAGAIN) stands behind it
    err = _probe(snap, "    import subprocess\n    subprocess.run(['true'])\n", preload=("subprocess",))
    assert "PermissionError" in err and "CompletedProcess" not in err
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o777)  # world-writable: Landlock (and RLIMIT_FSIZE) stand in the way
        target = os.path.join(d, "leak.txt")
        err = _probe(snap, f"    f = open({target!r}, 'w')\n    f.write('x' * 100)\n    f.close()\n")
        assert "PermissionError" in err, err
        assert not os.path.exists(target)  # not even an empty file
    names = ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_NPROC")
    err = _probe(snap, f"    raise RuntimeError(repr([resource.getrlimit(getattr(resource, n)) for n in {names!r}]))\n")
    cpu, mem, fsize, nofile, core, nproc = ast.literal_eval(err.split(": ", 1)[1].rsplit(" (line", 1)[0])
    assert cpu == (2, 3) and mem == (256 << 20,) * 2 and fsize == core == nproc == (0, 0) and nofile[0] <= 32
    body = "    raise RuntimeError(repr((dict(os.environ), os.getcwd(), [fd for fd in range(64) if valid(fd)])))\n"
    valid = "    def valid(fd):\n        try:\n            return bool(os.fstat(fd))\n"
    valid += "        except OSError:\n            return False\n"
    err = _probe(snap, valid + body)
    env, cwd, fds = ast.literal_eval(err.split(": ", 1)[1].rsplit(" (line", 1)[0])
    # empty but for the interpreter's own C-locale coercion; cwd was a fresh dir, removed since
    assert set(env) <= {"LC_CTYPE"} and os.path.basename(cwd).startswith("reled_sandbox_") and not os.path.exists(cwd)
    assert fds == [0, 1, 2]  # stdin, stdout, stderr: no ruleset or library fd left open
    err = _probe(snap, "    import ctypes\n    raise RuntimeError(str(ctypes.CDLL(None).prctl(39, 0, 0, 0, 0)))\n")
    assert "RuntimeError: 1 " in err  # PR_GET_NO_NEW_PRIVS; /proc/self/status is no longer readable
    err = _probe(snap, "    raise RuntimeError(open('/proc/self/status').read())\n")
    assert "PermissionError" in err
    if os.geteuid() == 0:
        err = _probe(snap, "    os.setuid(0)\n")
        assert "PermissionError" in err
        err = _probe(snap, "    raise RuntimeError(str(os.getuid()))\n")
        assert "RuntimeError: 65534" in err


def test_network_isolation(snap):
    res = _run(GOOD, snap)
    print("isolation:", res.isolation)
    iso = res.isolation
    assert iso["no_fork"] and iso["no_new_privs"] and iso["landlock"] and iso["seccomp"] and iso["missing"] == []
    assert sandbox_capabilities()["missing"] == []  # no skip: this machine and CI have every mechanism
    if os.geteuid() == 0:
        assert iso["unprivileged"] and iso["uid"] == 65534
    assert iso["netns"] and iso["net_interfaces"] == ["lo"]
    sock = "    s = socket.socket()\n    s.settimeout(1)\n    s.connect(('1.1.1.1', 80))\n"
    sock += "    raise RuntimeError('connected')\n"
    err = _probe(snap, "    import socket\n" + sock, preload=("socket",))
    assert "PermissionError" in err and "connected" not in err, err
    err = _probe(snap, "    import socket\n" + sock)  # without the preload: the module cannot even be read
    assert "ModuleNotFoundError" in err, err


def test_twenty_programs_back_to_back(snap):
    walls, cpus = [], []
    t0 = time.monotonic()
    for _ in range(20):
        res = run_program(GOOD, snap)
        assert res.executed, res.error
        walls.append(res.wall_s)
        cpus.append(res.cpu_s)
    total = time.monotonic() - t0
    print(
        f"\n20 runs in {total:.2f} s; wall per run: mean {np.mean(walls) * 1e3:.0f} ms, "
        f"max {np.max(walls) * 1e3:.0f} ms; child CPU mean {np.mean(cpus) * 1e3:.0f} ms"
    )


def test_libc_unshare_symbol_present():
    # the preexec_fn silently skips namespaces without it; make that visible
    assert hasattr(ctypes.CDLL(None), "unshare")


# ---- non-ASCII names and what the child's text may hold ---------------------------------------------


def test_non_ascii_identifiers_run(snap):
    src = (
        "def plan(api):\n    for straße in api.agents():\n        ziel = api.destination(straße)\n"
        "        api.move_to_by_shortest_path(straße, ziel)\n        print('über', straße)\n"
    )
    validate_program(src)
    res = _run(src, snap)  # the compiler needs unicodedata, imported before the lockdown
    assert res.executed, res.error
    assert res.stdout.count("über") == len(snap["agents"])


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in _strings(k) + _strings(v)]
    if isinstance(obj, list | tuple):
        return [s for v in obj for s in _strings(v)]
    return []


def _assert_safe(res) -> None:
    strings = _strings(dataclasses.asdict(res))
    assert strings
    for s in strings:
        s.encode("utf-8")  # raises on a lone surrogate
        assert is_safe(s), repr(s[:200])
    assert len((res.error or "").encode()) <= 2_000 and len(res.stdout.encode()) <= 16_000
    assert all(len(k.encode()) <= 200 and len(m.encode()) <= 300 for k, m in res.route_errors.items())


NASTY = '"\\ud800" + "\\x00" + "\\x1b[31m" + "\\r" + "\\x07" + "\\u009b"'


def test_surrogates_controls_and_ansi_are_cleaned(snap):
    first = snap["agents"][0]["id"]
    src = f"""
def plan(api):
    print({NASTY}, "\\udfff" * 3)
    out = {{{NASTY}: ["e"], "ok" + {NASTY}: [{NASTY}]}}
    out[{first!r}] = [{NASTY}]
    return out
"""
    res = _run(src, snap)
    assert res.reason == "invalid_route"
    _assert_safe(res)
    assert "\ufffd" in res.stdout and "[31m" in res.stdout  # cleaned, not dropped
    nasty = safe_text("\ud800\x00\x1b[31m\r\x07\u009b")
    assert nasty == "\ufffd" * 3 + "[31m\n" + "\ufffd" * 2
    assert first in res.route_errors and "not an agent" in res.route_errors[nasty]
    res = _run(f"def plan(api):\n    raise ValueError({NASTY} * 1000)\n", snap)
    assert res.reason == "runtime_error" and "ValueError" in res.error
    _assert_safe(res)


def test_ten_megabytes_of_output_are_bounded(snap):
    res = _run(
        "def plan(api):\n    print('x' * 10**7)\n    return {'k' * 10**7: ['e']}\n", snap, max_output_bytes=30_000_000
    )
    assert res.reason == "invalid_route" and len(res.stdout) <= 16_000
    _assert_safe(res)
    many = "def plan(api):\n    return {'\\ud800' + str(i): ['\\x00'] for i in range(10000)}\n"
    res = _run(many, snap)
    assert res.reason == "invalid_route" and len(res.route_errors) <= len(snap["agents"]) + 21
    _assert_safe(res)


def test_a_compromised_child_cannot_send_unsafe_text(snap):
    """Past every layer, the child writes its own reply: the parent still cleans and bounds it."""
    reply = {
        "ok": False,
        "category": "runtime_error",
        "error": "\ud800\x00\x1b[2J" * 100_000,
        "stdout": "\udfff\r\x1b]0;title\x07" * 100_000,
        "isolation": {"uid": "\ud800", "landlock_error": "\x1b[2J" * 1000, "net_interfaces": ["\x00"] * 100},
    }
    src = f"import json, os\ndef plan(api):\n    os.write(1, json.dumps({reply!r}).encode())\n    os._exit(0)\n"
    res = _run_unvalidated(src, snap, max_output_bytes=10_000_000)
    assert res.reason == "runtime_error"
    _assert_safe(res)
    routes = {"\ud800" * 1000 + str(i): ["\x00" * 1000] for i in range(100)}
    reply = {"ok": True, "routes": routes}
    src = f"import json, os\ndef plan(api):\n    os.write(1, json.dumps({reply!r}).encode())\n    os._exit(0)\n"
    res = _run_unvalidated(src, snap, max_output_bytes=10_000_000)
    assert res.reason == "invalid_route"
    _assert_safe(res)
    res = _run_unvalidated(
        "import os\ndef plan(api):\n    os.write(2, b'\\xff\\x00\\x1b[2J' * 10000)\n    os._exit(3)\n", snap
    )
    assert res.reason == "crash"
    _assert_safe(res)
