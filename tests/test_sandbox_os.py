"""The sandbox's OS layer on its own, for a root parent and for an ordinary user's.

Every program here runs through `_run_unvalidated`: no AST validation, the real builtins, and
socket/subprocess/signal/ctypes imported before the lockdown, i.e. the worst case of a validator
bug. Each case checks the concrete effect from outside the sandbox (the file does not exist, the
victim process lives and is not traced, its priority and limits are unchanged, the secret did not
come back), not only that the program failed. The same driver runs the cases twice: as root (the
child drops to nobody) and as an ordinary user made for the test (no uid drop: Landlock and seccomp
alone stand where DAC does not). Nothing is skipped: a kernel without Landlock ABI 6 or seccomp
fails these tests.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import json
import os
import pwd
import secrets
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_sandbox import HOSTILE  # the validator's hostile set: here it meets the OS layer alone

from reled_hpc.expert.sandbox import sandbox_capabilities, snapshot_from
from reled_hpc.text import is_safe

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534
PRELOAD = ["socket", "subprocess", "signal"]  # ctypes, os, stat, errno, resource: already in the child

# What every hostile program starts with. `attempt` records 'denied <exc> <errno>' or 'DONE <value>';
# the report comes back in the error message (the program's only channel out).
PRELUDE = """import ctypes, errno, os, resource, signal, socket, stat, subprocess
LIBC = ctypes.CDLL(None, use_errno=True)
OUT = {}
def attempt(name, fn):
    try:
        r = fn()
    except BaseException as e:
        OUT[name] = "denied " + type(e).__name__ + " " + str(getattr(e, "errno", None))
        return
    OUT[name] = "DONE " + repr(r)[:60]
def raw(name, nr, *args):
    def call():
        r = LIBC.syscall(nr, *args)
        if r < 0:
            raise OSError(ctypes.get_errno(), "syscall")
        return r
    attempt(name, call)
def socket_fds():
    n = 0
    for fd in range(64):
        try:
            n += stat.S_ISSOCK(os.fstat(fd).st_mode)
        except OSError:
            continue
    return n
def plan(api):
@BODY
    OUT["socket_fds"] = socket_fds()
    raise RuntimeError("REPORT " + repr(OUT))
"""

# name -> body of plan (4-space indent). @tmp: a world-writable dir; @dirs: every writable place;
# @home: a dir owned by the child's uid, holding @own (a file of that uid); @secret: a world-readable
# file; @victim: a process of the child's uid; @token: unique per run.
CASES: dict[str, str] = {
    "create_files": """
    for i, d in enumerate(@dirs):
        p = d + "/reled_probe_@token"
        attempt("open%d" % i, lambda p=p: open(p, "w").close())
        attempt("os.open%d" % i, lambda p=p: os.close(os.open(p + "b", os.O_CREAT | os.O_WRONLY, 0o666)))
        attempt("mkdir%d" % i, lambda p=p: os.mkdir(p + "d"))
""",
    "special_files": """
    for i, d in enumerate(@dirs):
        p = d + "/reled_probe_@token"
        attempt("fifo%d" % i, lambda p=p: os.mkfifo(p + "f"))
        attempt("symlink%d" % i, lambda p=p: os.symlink("/etc/passwd", p + "s"))
        attempt("link%d" % i, lambda p=p: os.link("@own", p + "l"))
""",
    "modify_own_file": """
    attempt("truncate", lambda: open("@own", "w").close())
    attempt("append", lambda: open("@own", "a").write("x"))
    attempt("os.truncate", lambda: os.truncate("@own", 0))
    attempt("rename", lambda: os.rename("@own", "@own.moved"))
    attempt("unlink", lambda: os.unlink("@own"))
    attempt("chmod", lambda: os.chmod("@own", 0o777))
    attempt("chmod dir", lambda: os.chmod("@home", 0o777))
    attempt("utime", lambda: os.utime("@own", (0, 0)))
    attempt("setxattr", lambda: os.setxattr("@own", "user.x", b"1"))
    raw("fchmodat2", 452, -100, b"@own", 0o777, 0)
""",
    "read_files": """
    for p in ["/etc/passwd", "/etc/hostname", "@secret", "@own", "@repo_file", "/proc/1/environ",
              "/proc/" + str(os.getppid()) + "/environ", "/proc/self/environ", "/proc/self/maps"]:
        attempt("read " + p, lambda p=p: open(p, "rb").read(40))
    attempt("/proc/self/mem", lambda: os.open("/proc/self/mem", os.O_RDWR))
    attempt("listdir /", lambda: os.listdir("/"))
    attempt("listdir tmp", lambda: os.listdir("@tmp"))
    attempt("exec script", lambda: os.execv("/bin/sh", ["sh", "-c", "cat @secret"]))
""",
    "sockets": """
    for fam, typ in [(socket.AF_INET, socket.SOCK_STREAM), (socket.AF_INET, socket.SOCK_DGRAM),
                     (socket.AF_INET6, socket.SOCK_STREAM), (socket.AF_UNIX, socket.SOCK_STREAM),
                     (socket.AF_UNIX, socket.SOCK_DGRAM), (socket.AF_NETLINK, socket.SOCK_RAW),
                     (socket.AF_PACKET, socket.SOCK_RAW)]:
        attempt("socket %d/%d" % (fam, typ), lambda f=fam, t=typ: socket.socket(f, t))
    attempt("socketpair", lambda: socket.socketpair())
    attempt("abstract", lambda: socket.socket(socket.AF_UNIX).connect("\\0@abstract"))
    attempt("tcp", lambda: socket.socket().connect(("127.0.0.1", @port)))
    raw("raw socket", 41, 2, 1, 0)
""",
    # the x32 ABI (same arch, syscall numbers | 0x40000000): libseccomp's arch check kills the process
    "x32_socket": """
    raw("x32 socket", 0x40000000 | 41, 2, 1, 0)
""",
    "processes": """
    def fork():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        return pid
    attempt("fork", fork)
    attempt("posix_spawn", lambda: os.posix_spawn("/bin/true", ["true"], {}))
    def system():
        r = os.system("true")  # returns -1 rather than raising when it cannot fork
        if r != 0:
            raise OSError(r, "system")
        return r
    attempt("system", system)
    attempt("subprocess", lambda: subprocess.run(["true"]).returncode)
    attempt("thread", lambda: __import__("_thread").start_new_thread(print, ()))
    raw("clone3", 435, 0, 0)
    raw("vfork", 58)
    raw("unshare", 272, 0x10000000 | 0x20000)
    raw("io_uring_setup", 425, 1, 0)
    raw("bpf", 321, 0, 0, 0)
    attempt("exec", lambda: os.execv("/bin/true", ["true"]))
""",
    "other_processes": """
    v, parent = @victim, os.getppid()
    attempt("kill victim", lambda: os.kill(v, signal.SIGKILL))
    attempt("kill parent", lambda: os.kill(parent, signal.SIGKILL))
    attempt("probe all", lambda: os.kill(-1, 0))
    raw("tgkill victim", 234, v, v, 9)
    raw("tkill victim", 200, v, 9)
    attempt("pidfd", lambda: os.pidfd_open(v))
    raw("ptrace attach", 101, 16, v, 0, 0)
    raw("ptrace seize", 101, 0x4206, v, 0, 0)
    raw("process_vm_readv", 310, v, 0, 0, 0, 0, 0)
    attempt("prlimit victim", lambda: resource.prlimit(v, resource.RLIMIT_NOFILE, (3, 3)))
    attempt("renice victim", lambda: os.setpriority(os.PRIO_PROCESS, v, 19))
    attempt("affinity victim", lambda: os.sched_setaffinity(v, {0}))
    attempt("setuid 0", lambda: os.setuid(0))
    raw("F_SETOWN victim", 72, 0, 8, v)  # fcntl: SIGIO to the victim on stdin activity
    raw("F_SETOWN_EX", 72, 1, 15, 0)
    raw("shmget", 29, 0, 4096, 0o1666)  # SysV IPC: objects outside any file system
    raw("msgget", 68, 0, 0o1666)
""",
}
# The raw syscall numbers above are x86_64's; the test machine and CI are x86_64.
assert os.uname().machine == "x86_64", "CASES use x86_64 syscall numbers"

DRIVER = """
import dataclasses, json, os, sys
from reled_hpc.expert.sandbox import _run_unvalidated, run_program, sandbox_capabilities
job = json.load(open(sys.argv[1]))
out = {"capabilities": sandbox_capabilities(), "uid": os.getuid(), "results": {}}
for name, case in job["cases"].items():
    if case["validated"]:
        res = run_program(case["source"], job["snapshot"])
    else:
        res = _run_unvalidated(case["source"], job["snapshot"], preload=case["preload"])
    out["results"][name] = dataclasses.asdict(res)
print(json.dumps(out))
"""

GOOD = {  # the normal path must keep working under the lockdown, for both parents
    "good": "def plan(api):\n    for a in api.agents():\n        api.move_to_by_shortest_path(a, api.destination(a))\n",
    "non_ascii": (
        "def plan(api):\n    for straße in api.agents():\n        ziel = api.destination(straße)\n"
        "        move_to_by_fastest_path(straße, ziel)\n        print('routed', straße, 'über', len(route(straße)))\n"
    ),
}


@pytest.fixture(scope="module")
def snap(grid):
    g = grid.graph
    rng = np.random.default_rng(11)
    agents = []
    while len(agents) < 4:
        o, d = (int(x) for x in rng.choice(g.n_edges, size=2, replace=False))
        if len(g.route(o, d)) >= 3:
            agents.append({"id": f"veh{len(agents)}", "edge": o, "dest": d})
    return snapshot_from(g, agents)


def _report(res: dict) -> dict[str, str]:
    assert res["reason"] == "runtime_error" and "REPORT " in (res["error"] or ""), (res["reason"], res["error"])
    text = res["error"].split("REPORT ", 1)[1].rsplit(" (line", 1)[0]
    return ast.literal_eval(text)


@contextlib.contextmanager
def _traversable(paths: list[str]) -> Iterator[None]:
    """Grant others traverse-only (o+x) on the directories above `paths` that lack it, restore after.

    Why: the venv's interpreter and its stdlib live under /root (0700), so an ordinary user cannot
    start this Python at all. o+x without o+r lets a user reach only names it already knows, not
    list /root; the files below keep their own modes. Restored in `finally`; an flock serialises
    concurrent runs so one cannot restore a mode while another still needs it."""
    dirs: set[Path] = set()
    for p in paths:
        dirs.update(Path(os.path.realpath(p)).parents)
    with open(__file__) as lock:  # an flock on this file: nothing is left behind to clean up
        fcntl.flock(lock, fcntl.LOCK_EX)
        changed: list[tuple[Path, int]] = []
        try:
            for d in sorted(dirs):
                mode = stat.S_IMODE(d.stat().st_mode)
                if not mode & stat.S_IXOTH:
                    changed.append((d, mode))
                    os.chmod(d, mode | stat.S_IXOTH)
            yield
        finally:
            for d, mode in reversed(changed):
                os.chmod(d, mode)


@contextlib.contextmanager
def _ordinary_user() -> Iterator[pwd.struct_passwd]:
    name = f"reledsbx{os.getpid() % 100000}"
    subprocess.run(["useradd", "-M", "-U", "-s", "/usr/sbin/nologin", "-d", "/nonexistent", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=True)  # fails if a process of it survived: loud


def _as(uid: int, gid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]


class World:
    """The places and processes one run of the cases is checked against."""

    def __init__(self, root: Path, uid: int, gid: int) -> None:
        self.token = secrets.token_hex(6)
        self.tmp = root / "world"  # world-writable: only the sandbox stands in the way
        self.tmp.mkdir()
        os.chmod(self.tmp, 0o777)
        self.home = root / "home"  # the child's own: DAC allows everything here
        self.home.mkdir(mode=0o700)
        os.chown(self.home, uid, gid)
        self.own = self.home / "own.txt"
        self.own.write_text("original")
        os.chown(self.own, uid, gid)
        os.chmod(self.own, 0o600)
        readable = root / "readable"
        readable.mkdir()
        os.chmod(readable, 0o755)
        self.secret = readable / "secret.txt"
        self.secret.write_text(f"SECRET-{self.token}")
        os.chmod(self.secret, 0o644)
        self.dirs = [str(self.tmp), "/tmp", "/dev/shm", "/var/tmp", str(self.home), "."]
        self.victim = subprocess.Popen([*_as(uid, gid), "sleep", "300"])
        self.abstract = f"reled_sbx_{self.token}"
        self.listeners = [socket.socket(socket.AF_UNIX), socket.socket()]
        self.listeners[0].bind("\0" + self.abstract)
        self.listeners[1].bind(("127.0.0.1", 0))
        for s in self.listeners:
            s.listen()
            s.setblocking(False)
        time.sleep(0.05)  # setpriv has exec'd sleep
        self.victim_prio = os.getpriority(os.PRIO_PROCESS, self.victim.pid)
        self.victim_limits = Path(f"/proc/{self.victim.pid}/limits").read_text()

    def source(self, body: str) -> str:
        subs = {
            "@dirs": repr(self.dirs),
            "@tmp": str(self.tmp),
            "@home": str(self.home),
            "@own": str(self.own),
            "@secret": str(self.secret),
            "@repo_file": str(REPO / "pyproject.toml"),
            "@victim": str(self.victim.pid),
            "@token": self.token,
            "@abstract": self.abstract,
            "@port": str(self.listeners[1].getsockname()[1]),
        }
        for k, v in subs.items():
            body = body.replace(k, v)
        return PRELUDE.replace("@BODY", body.strip("\n"))

    def close(self) -> None:
        self.victim.kill()
        self.victim.wait()
        for s in self.listeners:
            s.close()
        for d in self.dirs[1:4]:  # /tmp, /dev/shm, /var/tmp: what a failing run created there (root's dirs go with it)
            for p in Path(d).glob(f"reled_probe_{self.token}*"):
                (os.rmdir if p.is_dir() and not p.is_symlink() else os.unlink)(p)


def _drive(world: World, snap: dict, user: pwd.struct_passwd | None, root: Path) -> dict:
    cases = {n: {"source": world.source(b), "preload": PRELOAD, "validated": False} for n, b in CASES.items()}
    cases["no_preload"] = {
        "source": "def plan(api):\n    import socket\n    socket.socket()\n",
        "preload": [],
        "validated": False,
    }
    cases.update({f"hostile:{n}": {"source": s, "preload": PRELOAD, "validated": False} for n, s in HOSTILE.items()})
    cases.update({n: {"source": s, "preload": [], "validated": True} for n, s in GOOD.items()})
    job, driver = root / "job.json", root / "driver.py"
    job.write_text(json.dumps({"cases": cases, "snapshot": snap}))
    driver.write_text(DRIVER)
    for p in (job, driver):
        os.chmod(p, 0o644)
    cmd = [sys.executable, str(driver), str(job)]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(world.home)}
    if user is not None:
        cmd = [*_as(user.pw_uid, user.pw_gid), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(world.tmp), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]  # the driver (the sandbox's parent) was not killed
    return json.loads(proc.stdout)


@pytest.fixture(scope="module", params=["root", "ordinary_user"])
def run(request, snap):
    """(mode, World, driver output) after running every case once in that mode."""
    assert os.geteuid() == 0, "these tests make a user and run as it: run them as root (as CI does)"
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reled_sbx_os_")))
        os.chmod(root, 0o755)
        user = None
        if request.param == "ordinary_user":
            user = stack.enter_context(_ordinary_user())
            stack.enter_context(_traversable([sys.executable, os.__file__]))
        uid, gid = (user.pw_uid, user.pw_gid) if user else (NOBODY, NOBODY)
        world = World(root, uid, gid)
        stack.callback(world.close)
        t0 = time.monotonic()
        out = _drive(world, snap, user, root)
        print(f"\n{request.param}: {len(out['results'])} sandbox runs in {time.monotonic() - t0:.1f} s")
        yield request.param, world, out


def test_capabilities_all_present(run):
    mode, _, out = run
    caps = out["capabilities"]
    assert caps["missing"] == [], caps  # this machine and CI have Landlock ABI >= 6, seccomp, netns
    assert caps["landlock_abi"] >= 6 and caps["uid_drop"] == (mode == "root")
    assert (out["uid"] == 0) == (mode == "root")  # the parent really ran as the ordinary user
    assert sandbox_capabilities()["missing"] == []


def test_normal_path_and_non_ascii_names_work(run):
    mode, _, out = run
    for name in GOOD:
        res = out["results"][name]
        assert res["reason"] is None and res["routes"], (mode, name, res["error"])
        iso = res["isolation"]
        assert iso["missing"] == [], iso
        assert iso["landlock"] and iso["seccomp"] and iso["no_new_privs"] and iso["netns"] and iso["no_fork"]
        assert iso["net_interfaces"] == ["lo"]
        # root: setuid(nobody); an ordinary user: inside a user namespace with no uid map, where the
        # kernel shows the overflow uid (also 65534); the parent's uid is checked in the test above
        assert iso["uid"] == NOBODY and iso["unprivileged"]
    assert "routed" in out["results"]["non_ascii"]["stdout"] and "über" in out["results"]["non_ascii"]["stdout"]


def test_no_import_after_lockdown(run):
    _, _, out = run
    res = out["results"]["no_preload"]
    assert res["reason"] == "runtime_error" and (
        "ModuleNotFoundError" in res["error"] or "PermissionError" in res["error"]
    )


def _all_denied(report: dict[str, str], *, allow: tuple[str, ...] = ()) -> None:
    done = {k: v for k, v in report.items() if k != "socket_fds" and k not in allow and not v.startswith("denied")}
    assert not done, done
    assert report["socket_fds"] == 0


def test_no_file_is_created_anywhere(run):
    mode, world, out = run
    for case in ("create_files", "special_files"):
        report = _report(out["results"][case])
        _all_denied(report)
        assert sum(k.startswith(("open", "fifo")) for k in report) == len(world.dirs), report
    leftovers = [
        f"{d}/reled_probe_{world.token}{suffix}"
        for d in world.dirs
        if d != "."
        for suffix in ("", "b", "d", "f", "s", "l")
        if os.path.lexists(f"{d}/reled_probe_{world.token}{suffix}")
    ]
    assert leftovers == [], (mode, leftovers)
    assert not list(world.tmp.iterdir()) and [p.name for p in world.home.iterdir()] == ["own.txt"]


def test_own_files_are_not_changed(run):
    _, world, out = run
    before = os.stat(world.own)
    _all_denied(_report(out["results"]["modify_own_file"]))
    assert world.own.read_text() == "original"
    after = os.stat(world.own)
    assert stat.S_IMODE(after.st_mode) == 0o600 and after.st_mtime == before.st_mtime
    assert stat.S_IMODE(os.stat(world.home).st_mode) == 0o700
    assert os.listxattr(world.own) == []


def test_nothing_is_read(run):
    _, world, out = run
    res = out["results"]["read_files"]
    _all_denied(_report(res))
    assert world.token not in json.dumps(res) and "root:x:0" not in json.dumps(res)


def test_no_socket_of_any_family(run):
    _, world, out = run
    report = _report(out["results"]["sockets"])
    _all_denied(report)
    refused = {k: v for k, v in report.items() if k != "socket_fds" and not v.endswith(" 1")}
    assert not refused, refused  # EPERM from seccomp for every family
    for s in world.listeners:
        with pytest.raises(BlockingIOError):
            s.accept()  # nobody connected


def test_validator_hostile_set_gets_nothing_from_the_os(run):
    _, _, out = run
    hostile = {n: r for n, r in out["results"].items() if n.startswith("hostile:")}
    assert len(hostile) == len(HOSTILE)
    for name, res in hostile.items():
        assert not res["routes"] and res["reason"] is not None, (name, res)  # no program routes anyone
        assert "root:x:0" not in json.dumps(res), name
    assert "PermissionError" in hostile["hostile:open"]["error"]  # /etc/passwd
    # os.system('id') cannot fork: it returns -1 instead of raising, so the program returns None
    assert hostile["hostile:import_inside"]["reason"] == "invalid_route"


def test_foreign_abi_syscall_kills_the_child(run):
    res = run[2]["results"]["x32_socket"]
    assert res["reason"] == "crash" and f"status {-31}" in res["error"], res  # SIGSYS: SECCOMP_RET_KILL_PROCESS


def test_no_process_is_started(run):
    _, _, out = run
    report = _report(out["results"]["processes"])
    _all_denied(report)
    for k in ("fork", "clone3", "vfork", "unshare", "io_uring_setup", "bpf", "exec"):
        assert report[k].endswith(" 1"), (k, report[k])  # EPERM from seccomp, not EAGAIN/EFAULT/ENOENT


def test_other_processes_are_untouched(run):
    _, world, out = run
    report = _report(out["results"]["other_processes"])
    _all_denied(report)
    assert world.victim.poll() is None  # alive
    status = Path(f"/proc/{world.victim.pid}/status").read_text()
    assert "\nTracerPid:\t0\n" in status
    assert os.getpriority(os.PRIO_PROCESS, world.victim.pid) == world.victim_prio
    assert Path(f"/proc/{world.victim.pid}/limits").read_text() == world.victim_limits


def test_reports_are_safe_text(run):
    _, _, out = run
    for res in out["results"].values():
        for s in _strings(res):
            assert is_safe(s)


def _strings(obj) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _strings(v)
