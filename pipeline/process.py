"""Who a process is, as another process judges it: its host, its pid namespace and its start time.

A pid names a process only on the host and in the pid namespace that wrote it down: containers that share a
host name and a volume see each other's pids as unrelated numbers. So the teacher cache's lock
(pipeline/lock.py) and prepare's temp folders (pipeline/data/shards.py) record both, and judge a recorded pid
dead only from inside the namespace that recorded it.
"""

from __future__ import annotations

import hashlib
import os
import socket


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 on ([] where it cannot be read). The command name (field 2) may hold
    spaces and parentheses: parse after its closing parenthesis."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return []
    return stat[stat.rfind(")") + 2 :].split()


def proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), which tells a live holder from an
    unrelated process that later got the same pid; None where /proc is not available."""
    fields = _stat_fields(pid)
    return int(fields[19]) if len(fields) > 19 else None


def proc_state(pid: int) -> str:
    """The process's state letter ("Z": exited, not yet reaped); "" where /proc does not say."""
    fields = _stat_fields(pid)
    return fields[0] if fields else ""


def pid_namespace() -> str:
    """This process's pid namespace ("" where /proc does not say)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def here_tag() -> str:
    """This host and pid namespace as a short name-safe tag (a host name may hold characters a folder name
    should not): two processes with the same tag can judge each other's pids."""
    return hashlib.sha1(f"{socket.gethostname()} {pid_namespace()}".encode()).hexdigest()[:8]


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process of this pid namespace (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def why_ended(host: object, pidns: object, pid: object, start: object) -> str:
    """Why the process that recorded (host, pid namespace, pid, start time) is known to have ended: gone, a
    zombie, or its pid reused by another process. "" when it may still run, which includes every process of
    another host or pid namespace (its pid is not ours to judge). ``start`` None: not recorded (an earlier
    version's record, or no /proc), so a reused pid counts as the recorder, the safe direction."""
    if host != socket.gethostname() or pidns != pid_namespace():
        return ""
    if not isinstance(pid, int) or pid <= 0:
        return "no valid pid is recorded"
    if not alive(pid):
        return f"pid {pid} is not running"
    if proc_state(pid) == "Z":
        return f"pid {pid} has exited (zombie)"
    now = proc_start(pid)
    if start is not None and now is not None and now != start:
        return f"pid {pid} now belongs to another process"
    return ""
