"""CPU accounting of started processes from Linux ``/proc``: on a shared 2-core machine a benchmark's
figures mean something only next to what each component, and everything else, used meanwhile."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tests.service_process import ServiceProcess

CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process so far; None when it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_snapshot() -> tuple[dict[int, float], dict[str, float]]:
    """CPU seconds (utime+stime+cutime+cstime) per process group, and of all PostgreSQL and Redis
    server processes (every client's, not only the caller's)."""
    groups: dict[int, float] = {}
    servers = {"postgres": 0.0, "redis": 0.0}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        # fields[0] is the state (field 3 of stat); pgrp is field 5, utime..cstime fields 14-17
        ticks = sum(int(x) for x in fields[11:15]) / CLK_TCK
        groups[int(fields[2])] = groups.get(int(fields[2]), 0.0) + ticks
        if comm.startswith("postgres"):
            servers["postgres"] += ticks
        elif comm.startswith("redis-server"):
            servers["redis"] += ticks
    return groups, servers


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return float(sum(parts) - idle), float(sum(parts))


def wait_quiet(max_wait: float, report: Callable[[str], None], busy_below: float = 0.15,
               window: float = 5.0) -> float:
    """Wait (at most ``max_wait`` s) until the machine is under ``busy_below`` busy for a whole
    ``window``; returns the last window's busy fraction. The caller's own services are idle by then."""
    deadline = time.monotonic() + max_wait
    reported = False
    while True:
        m0 = machine_cpu()
        time.sleep(window)
        m1 = machine_cpu()
        busy = (m1[0] - m0[0]) / max(m1[1] - m0[1], 1.0)
        if busy < busy_below or time.monotonic() >= deadline:
            if reported or busy >= busy_below:
                report(f"machine {100 * busy:.0f} % busy over {window:g} s; going on")
            return busy
        if not reported:
            report(f"machine {100 * busy:.0f} % busy with other work; waiting up to {max_wait:.0f} s for it to "
                   f"fall under {100 * busy_below:.0f} %")
            reported = True


class CpuWindow:
    """CPU seconds used by each component (process groups started by :class:`ServiceProcess`), by the
    caller's own process group, by PostgreSQL, Redis and the rest of the machine between start() and end()."""

    def __init__(self, groups: Mapping[str, Sequence[ServiceProcess]], own_label: str = "caller") -> None:
        self.groups = groups
        self.own_label = own_label

    def start(self) -> CpuWindow:
        self.t0 = time.time()
        self.snap0, self.machine0 = cpu_snapshot(), machine_cpu()
        return self

    def end(self) -> tuple[dict[str, float], float, float]:
        """(CPU seconds per component, machine busy fraction, window seconds)."""
        snap1, machine1 = cpu_snapshot(), machine_cpu()

        def used(pgid: int) -> float:
            return snap1[0].get(pgid, 0.0) - self.snap0[0].get(pgid, 0.0)

        cpu = {k: round(sum(used(p.proc.pid) for p in ps if p.proc is not None), 2) for k, ps in self.groups.items()}
        cpu[self.own_label] = round(used(os.getpgrp()), 2)
        for server in ("postgres", "redis"):
            cpu[f"{server} (all clients)"] = round(snap1[1][server] - self.snap0[1][server], 2)
        busy_seconds = (machine1[0] - self.machine0[0]) / CLK_TCK
        cpu["everything else on the machine"] = round(max(busy_seconds - sum(cpu.values()), 0.0), 2)
        busy = (machine1[0] - self.machine0[0]) / max(machine1[1] - self.machine0[1], 1.0)
        return cpu, busy, time.time() - self.t0
