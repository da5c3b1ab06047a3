"""A cgroup per sandbox: one bound on the memory and the tasks of everything a program starts.

Why: the harness's RLIMIT_AS is per process, so N processes hold up to N x memory_mb (8 x 900 MB
took 3.2 GB of host RAM against memory_mb=1024). A cgroup bounds their sum (memory.max: anonymous
memory and the sandbox's tmpfs pages alike, no swap) and their number (pids.max).

Sandbox cgroups are made below our own cgroup (so the limits of the job or container we run in
still hold) where the host lets us: the cgroup v1 memory and pids hierarchies (root on a v1 or
hybrid host), or cgroup v2 when our cgroup may enable memory and pids for children (the root
cgroup; a non-root v2 cgroup that holds processes may not: "no internal processes"). On v2 an
operator can name a delegated cgroup instead (MEGATRON_RING_SANDBOX_CGROUP: memory and pids in
its subtree_control, writable by the trainer, e.g. from `systemd-run -p Delegate=yes`).
Elsewhere (a non-root trainer without delegation, a read-only /sys/fs/cgroup) `available()` says
why not and the sandbox runs under its rlimits alone: a missing cgroup never stops a run. A
sandbox's cgroup is removed when the sandbox ends, after whatever is left in it is killed; ones
left by a killed worker (named by its pid) are removed by the next sandbox."""

from __future__ import annotations

import functools
import itertools
import os
import signal
import time

PREFIX = "megatron-ring-sandbox-"
PARENT_ENV = "MEGATRON_RING_SANDBOX_CGROUP"  # a delegated cgroup v2 directory to make sandboxes in
_counter = itertools.count()


def _mounts() -> list[tuple[str, str, str, set]]:
    """(mount point, root inside the hierarchy, fs type, super options) of the cgroup mounts."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            tail = fields[fields.index("-") + 1:]
            if tail[0] in ("cgroup", "cgroup2"):
                found.append((fields[4], fields[3], tail[0], set(tail[2].split(","))))
    return found


def _own_cgroups() -> dict[str, str]:
    """controller (or "" for v2) -> our cgroup's path, from /proc/self/cgroup."""
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                own[name] = path
    return own


def _directory(mount: str, root: str, path: str) -> str | None:
    """Where our cgroup `path` appears under a hierarchy mounted at `mount` (showing `root`)."""
    rel = os.path.relpath(path, root)
    if rel.startswith(".."):
        return None
    return os.path.normpath(os.path.join(mount, rel))


def _v2_parent() -> tuple[list, str]:
    configured = os.environ.get(PARENT_ENV)
    if configured:
        if not os.path.exists(os.path.join(configured, "cgroup.subtree_control")):
            return [], f"{PARENT_ENV}={configured} is not a cgroup v2 directory"
        return _v2_usable(configured)
    own = _own_cgroups()
    for mount, root, kind, _ in _mounts():
        if kind != "cgroup2" or "" not in own:
            continue
        parent = _directory(mount, root, own[""])
        if parent is not None and os.path.isdir(parent):
            return _v2_usable(parent)
    return [], "no cgroup v2 hierarchy of ours"


def _v2_usable(parent: str) -> tuple[list, str]:
    """Children of `parent` get memory and pids if its subtree_control has them (or takes them:
    refused, EBUSY, when processes live in `parent` itself, as they do in our own non-root cgroup)."""
    with open(os.path.join(parent, "cgroup.controllers")) as f:
        offered = f.read().split()
    missing = [c for c in ("memory", "pids") if c not in offered]
    if missing:
        return [], f"cgroup v2 at {parent} does not offer {', '.join(missing)}"
    with open(os.path.join(parent, "cgroup.subtree_control")) as f:
        enabled = f.read().split()
    if not {"memory", "pids"} <= set(enabled):
        try:
            with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                f.write("+memory +pids")
        except OSError as e:
            return [], f"cannot enable memory and pids below {parent}: {e.strerror}"
    return [(2, parent)], ""


def _v1_parents() -> tuple[list, str]:
    own, parents = _own_cgroups(), []
    for controller in ("memory", "pids"):
        for mount, root, kind, options in _mounts():
            if kind == "cgroup" and controller in options and controller in own:
                parent = _directory(mount, root, own[controller])
                if parent is not None and os.path.isdir(parent):
                    parents.append((1, parent))
                    break
        else:
            return [], f"no cgroup v1 {controller} hierarchy of ours"
    return parents, ""


class SandboxCgroup:
    """The cgroup(s) of one sandbox: one directory on v2, a memory and a pids one on v1."""

    def __init__(self, parents: list, memory_bytes: int, pids: int):
        name = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.dirs: list[str] = []
        try:
            for version, parent in parents:
                _sweep(parent)
                path = os.path.join(parent, name)
                os.mkdir(path)
                self.dirs.append(path)
                if version == 2:
                    self._write(path, "memory.max", memory_bytes)
                    self._write(path, "memory.swap.max", 0, optional=True)
                    self._write(path, "pids.max", pids)
                elif os.path.exists(os.path.join(path, "memory.limit_in_bytes")):
                    self._write(path, "memory.limit_in_bytes", memory_bytes)
                    self._write(path, "memory.memsw.limit_in_bytes", memory_bytes, optional=True)
                else:
                    self._write(path, "pids.max", pids)
        except BaseException:
            self.remove()
            raise

    @staticmethod
    def _write(path: str, name: str, value, optional: bool = False) -> None:
        target = os.path.join(path, name)
        if optional and not os.path.exists(target):
            return
        with open(target, "w") as f:
            f.write(str(value))

    def add(self, pid: int) -> None:
        for path in self.dirs:
            self._write(path, "cgroup.procs", pid)

    def peak_bytes(self) -> int | None:
        """The most memory the sandbox held (memory.peak on v2 >= 5.19, max_usage_in_bytes on v1)."""
        for path in self.dirs:
            for name in ("memory.peak", "memory.max_usage_in_bytes"):
                try:
                    with open(os.path.join(path, name)) as f:
                        return int(f.read())
                except OSError:
                    pass
        return None

    def remove(self, wait_s: float = 5.0) -> bool:
        """Kill what is left in the cgroup and remove it; False if it could not be removed."""
        deadline = time.monotonic() + wait_s
        while self.dirs:
            path = self.dirs[-1]
            _kill_all(path)
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError:  # EBUSY until the killed tasks have exited
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.01)
                continue
            self.dirs.pop()
        return True


def _kill_all(path: str) -> None:
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as f:  # v2, Linux >= 5.14
            f.write("1")
        return
    except OSError:
        pass
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            pids = [int(p) for p in f.read().split()]
    except OSError:
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _sweep(parent: str) -> None:
    """Remove sandbox cgroups whose owner process is gone (a reward worker killed mid-program)."""
    for name in os.listdir(parent):
        if not name.startswith(PREFIX):
            continue
        owner = name[len(PREFIX):].split("-")[0]
        if not owner.isdigit() or int(owner) == os.getpid():
            continue
        try:
            os.kill(int(owner), 0)
            continue  # alive: its own sandboxes
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _kill_all(os.path.join(parent, name))
        try:
            os.rmdir(os.path.join(parent, name))
        except OSError:
            pass  # still emptying: the next sweep takes it


@functools.lru_cache(maxsize=None)
def available() -> tuple[tuple, str]:
    """((version, parent directory), ...) where sandbox cgroups can be made, and a description:
    what is used, or why nothing is. Checked once per process by making (and removing) one."""
    reasons = []
    for find in (_v2_parent, _v1_parents):
        try:
            parents, reason = find()
        except (OSError, ValueError, IndexError) as e:
            parents, reason = [], f"{find.__name__}: {e}"
        if not parents:
            reasons.append(reason)
            continue
        try:
            SandboxCgroup(parents, 64 << 20, 8).remove()
        except OSError as e:
            reasons.append(f"cannot make a cgroup under {parents[0][1]}: {e.strerror or e}")
            continue
        version = parents[0][0]
        where = ", ".join(p for _, p in parents)
        return tuple(parents), f"cgroup v{version} under {where}"
    return (), "; ".join(reasons)


def create(memory_bytes: int, pids: int) -> SandboxCgroup | None:
    """A fresh cgroup for one sandbox, or None where the host gives us none."""
    parents, _ = available()
    if not parents:
        return None
    return SandboxCgroup(list(parents), memory_bytes, pids)
