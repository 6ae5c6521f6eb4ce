"""Irreversible self-confinement of the sandbox child (Landlock + seccomp), using only what an
unprivileged process may do. Standard library only: the child loads this file by path.

`lock_down()` is called by `sandbox_child.py` after it imported everything it will ever need and
before it reads the untrusted program. From then on, whatever code runs in the process, even with
ctypes and arbitrary syscalls:

- no_new_privs: exec (were it reached) gains no privileges; required by Landlock and seccomp.
- Landlock (ABI >= 1): a ruleset that handles every filesystem right of this ABI and grants none,
  so no path can be opened for reading, written, created, removed, linked or executed (the child
  keeps its inherited stdin/stdout/stderr pipes). ABI >= 4: TCP bind/connect denied. ABI >= 6:
  abstract unix sockets and signals scoped to the domain (no connecting out, no signalling out).
- seccomp (libseccomp, via ctypes): default allow, EPERM for the syscall classes Landlock does not
  cover: socket creation of every family, process creation (fork/vfork/clone/clone3), exec, ptrace
  and cross-process memory access, signals and scheduling/rlimit calls aimed at another process,
  namespaces/mounts, io_uring (its operations bypass seccomp), bpf/perf/userfaultfd/keyrings,
  uid/gid/capability changes, file metadata changes (chmod/chown/utime/xattr), inotify/fanotify,
  SysV IPC and POSIX message queues, fcntl F_SETOWN/F_SETSIG (SIGIO to another process);
  ENOSYS for syscalls newer than this list. Syscalls of a foreign ABI (int 0x80 on x86_64) kill
  the process.

Why libseccomp rather than a hand-written BPF program: it resolves syscall names per architecture,
adds the architecture check and handles the x32/multiplexed-ABI corner cases, which a hand-written
filter would have to get right per arch; it is on every distribution (it is what systemd, podman
and docker use), and reaching it through ctypes adds no Python dependency. Why a deny list rather
than an allow list: the filesystem and network are already closed by Landlock and the network
namespace; an allow list of the syscalls CPython happens to use would break on rare paths (memory
errors, a new glibc) without closing more than the classes listed here.

Each step is best effort and reported: `lock_down()` returns what held, so the parent can say what
this kernel lacks instead of failing to run anything.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from typing import Any

PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_GET_SECCOMP = 21

# Landlock (uapi/linux/landlock.h); the syscall numbers are the same on every architecture but alpha.
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
_FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
LANDLOCK_ACCESS_NET_BIND_TCP = 1 << 0
LANDLOCK_ACCESS_NET_CONNECT_TCP = 1 << 1
LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
LANDLOCK_SCOPE_SIGNAL = 1 << 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


# seccomp (seccomp.h of libseccomp 2.x)
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_FLTATR_ACT_BADARCH = 2
SCMP_CMP_NE = 1
SCMP_CMP_EQ = 4
_NR_SCMP_ERROR = -1


def scmp_act_errno(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _names(*groups: str) -> tuple[str, ...]:
    return tuple(" ".join(groups).split())


# Denied outright (EPERM). Names this architecture lacks (fork on aarch64) are skipped.
DENY = _names(
    # sockets of every family (AF_INET/INET6/UNIX/NETLINK/PACKET...); nothing is inherited but pipes
    "socket socketpair",
    # process creation and exec; clone is denied whole: the child needs no threads
    "fork vfork clone clone3 execve execveat",
    # other processes: tracing, their memory, pidfds (pidfd_send_signal/getfd), their memory policy
    "ptrace process_vm_readv process_vm_writev pidfd_open pidfd_getfd pidfd_send_signal process_madvise",
    "kcmp migrate_pages move_pages ioprio_set get_robust_list",
    # io_uring runs its operations (openat, connect, socket) outside seccomp's view
    "io_uring_setup io_uring_enter io_uring_register",
    # namespaces and mounts (in a user namespace the child holds capabilities over its own ones)
    "unshare setns mount umount2 pivot_root chroot move_mount open_tree fsopen fsconfig fsmount fspick",
    "mount_setattr",
    # kernel attack surface a routing program has no use for
    "bpf perf_event_open userfaultfd keyctl add_key request_key memfd_create memfd_secret",
    "name_to_handle_at open_by_handle_at init_module finit_module delete_module kexec_load kexec_file_load",
    "reboot swapon swapoff acct quotactl syslog uselib mknod mknodat",
    # identity and capabilities: already nobody (as root) or unmapped (user namespace); keep it so
    "setuid setgid setreuid setregid setresuid setresgid setfsuid setfsgid setgroups capset",
    # file metadata Landlock does not cover: an ordinary user's child could chmod/chown/touch or set
    # xattrs on that user's files (e.g. make ~/.ssh readable); inotify/fanotify watch others' access
    "chmod fchmod fchmodat fchmodat2 chown fchown lchown fchownat utime utimes utimensat futimesat",
    "setxattr lsetxattr fsetxattr removexattr lremovexattr fremovexattr",
    "inotify_init inotify_init1 inotify_add_watch fanotify_init fanotify_mark",
    # IPC objects that are no files (Landlock does not see them) but reach other processes of the uid
    "shmget shmat shmctl shmdt msgget msgsnd msgrcv msgctl semget semop semtimedop semctl",
    "mq_open mq_unlink mq_timedsend mq_timedreceive mq_notify mq_getsetattr",
)

# fcntl commands that make the kernel signal another process: F_SETOWN/F_SETOWN_EX name the target
# of SIGIO (default action: terminate) for I/O on the shared pipes, F_SETSIG picks the signal.
# Landlock's signal scope (ABI 6) covers them too; this holds where it is missing.
FCNTL_DENIED = (8, 10, 15)  # F_SETOWN, F_SETSIG, F_SETOWN_EX

# Syscalls added after fchmodat2 (452, Linux 6.6; numbers >= 424 are the same on every architecture
# but alpha) are unknown to this list and to libseccomp 2.5 (setxattrat, file_setattr, ...): ENOSYS,
# as on an older kernel, so a newer kernel cannot open a gap in the deny list.
FIRST_UNLISTED_NR = 453
LAST_BLOCKED_NR = 599

# Denied unless argument `arg` is `value`: 0 means "the calling process" for these, the own pid for
# the signal calls (pid/tgid), so a program may still raise a signal on itself (os.abort).
SELF_ONLY = (
    ("kill", 0, "pid"),
    ("tkill", 0, "pid"),
    ("tgkill", 0, "pid"),
    ("rt_sigqueueinfo", 0, "pid"),
    ("rt_tgsigqueueinfo", 0, "pid"),
    ("prlimit64", 0, 0),  # glibc's setrlimit/getrlimit pass pid 0; another pid could starve the parent
    ("setpriority", 1, 0),
    ("sched_setaffinity", 0, 0),
    ("sched_setscheduler", 0, 0),
    ("sched_setparam", 0, 0),
    ("sched_setattr", 0, 0),
)


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi(libc: Any | None = None) -> int:
    """The Landlock ABI version this kernel provides; 0 when it has none (or disabled it)."""
    libc = libc or _libc()
    try:
        v = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), LANDLOCK_CREATE_RULESET_VERSION)
    except (AttributeError, OSError):
        return 0
    return max(int(v), 0)


@functools.cache
def load_libseccomp() -> Any | None:
    """libseccomp by its stable SONAME (not ctypes.util.find_library: that runs ldconfig/gcc in a
    subprocess and writes temp files). Cached: the child loads it before it drops privileges."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def seccomp_available(libc: Any | None = None) -> bool:
    """True when the kernel has seccomp filters and libseccomp can be loaded (nothing is applied)."""
    libc = libc or _libc()
    return libc.prctl(PR_GET_SECCOMP, 0, 0, 0, 0) >= 0 and load_libseccomp() is not None


def probe() -> dict[str, Any]:
    """What this kernel and system provide, without applying anything (for the parent's report)."""
    libc = _libc()
    abi = landlock_abi(libc)
    return {
        "landlock_abi": abi,
        "landlock_fs": abi >= 1,
        "landlock_tcp": abi >= 4,
        "landlock_scope": abi >= 6,
        "seccomp": seccomp_available(libc),
    }


def _apply_landlock(libc: Any, abi: int) -> str | None:
    attr = _RulesetAttr(_FS_RIGHTS_BY_ABI[min(abi, 5)], 0, 0)
    if abi >= 4:
        attr.handled_access_net = LANDLOCK_ACCESS_NET_BIND_TCP | LANDLOCK_ACCESS_NET_CONNECT_TCP
    if abi >= 6:
        attr.scoped = LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL
    fd = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), 0)
    if fd < 0:
        return f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}"
    try:  # no landlock_add_rule at all: every handled right is denied everywhere
        if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, fd, 0) != 0:
            return f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}"
    finally:
        os.close(fd)
    return None


def _apply_seccomp(lib: Any) -> str | None:
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        return "seccomp_init failed"
    try:
        if lib.seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS) != 0:
            return "seccomp_attr_set(ACT_BADARCH) failed"
        eperm = scmp_act_errno(errno.EPERM)
        for name in DENY:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr == _NR_SCMP_ERROR:
                continue
            rc = lib.seccomp_rule_add_array(ctx, eperm, nr, 0, None)
            if rc != 0:
                return f"seccomp rule {name}: {os.strerror(-rc)}"
        enosys = scmp_act_errno(errno.ENOSYS)
        for nr in range(FIRST_UNLISTED_NR, LAST_BLOCKED_NR + 1):
            rc = lib.seccomp_rule_add_array(ctx, enosys, nr, 0, None)
            if rc != 0:
                return f"seccomp rule #{nr}: {os.strerror(-rc)}"
        for cmd in FCNTL_DENIED:
            for name in ("fcntl", "fcntl64"):
                nr = lib.seccomp_syscall_resolve_name(name.encode())
                if nr == _NR_SCMP_ERROR:
                    continue
                cmp = _ArgCmp(1, SCMP_CMP_EQ, cmd, 0)
                rc = lib.seccomp_rule_add_array(ctx, eperm, nr, 1, ctypes.byref(cmp))
                if rc != 0:
                    return f"seccomp rule {name}({cmd}): {os.strerror(-rc)}"
        pid = os.getpid()  # fixed for good: this process can no longer fork
        for name, arg, value in SELF_ONLY:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr == _NR_SCMP_ERROR:
                continue
            cmp = _ArgCmp(arg, SCMP_CMP_NE, pid if value == "pid" else int(value), 0)
            rc = lib.seccomp_rule_add_array(ctx, eperm, nr, 1, ctypes.byref(cmp))
            if rc != 0:
                return f"seccomp rule {name}: {os.strerror(-rc)}"
        rc = lib.seccomp_load(ctx)
        if rc != 0:
            return f"seccomp_load: {os.strerror(-rc)}"
    finally:
        lib.seccomp_release(ctx)
    return None


def lock_down() -> dict[str, Any]:
    """Confine the calling (single-threaded) process for good. Returns what held:
    {"no_new_privs", "landlock_abi", "landlock", "seccomp"} plus "<step>_error" where a step failed."""
    libc = _libc()
    info: dict[str, Any] = {}
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    info["no_new_privs"] = libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1
    abi = landlock_abi(libc)
    info["landlock_abi"] = abi
    err = _apply_landlock(libc, abi) if abi >= 1 and info["no_new_privs"] else "not provided by this kernel"
    info["landlock"] = err is None
    if err is not None:
        info["landlock_error"] = err
    lib = load_libseccomp()
    if lib is None:
        err = "libseccomp.so.2 not found"
    elif libc.prctl(PR_GET_SECCOMP, 0, 0, 0, 0) < 0:
        err = "seccomp not provided by this kernel"
    else:
        err = _apply_seccomp(lib)
    info["seccomp"] = err is None
    if err is not None:
        info["seccomp_error"] = err
    return info
