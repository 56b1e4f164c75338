"""How throughput grows with workers: `python -m benchmarks.workers [--workers 1,2] [--seconds 5]`

Starts the fast upstream, redis-server and Failgate with N workers (one run per N, a rate-limited route and a
passthrough route), drives 64 connections with the bundled generator and reports requests/s, the CPU per request
of the whole Failgate process tree (parent and workers, from /proc) and each process's resident memory. Everything
shares the machine's cores — the generator, the upstream and Redis too — so on a small machine this shows where
scaling stops, not how far it could go: say how the cores were shared when you quote it."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .load import Options, run_load
from .suite import _cpu_seconds, _failgate_config, _port, _wait_port, redis_command, stop_processes


def _tree(pid: int) -> list[int]:
    """The process and its children (the workers)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children")
    found = [int(p) for p in kids.read_text().split()] if kids.exists() else []
    return [pid, *found]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.workers", description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    work = Path(tempfile.mkdtemp(prefix="failgate-workers-"))
    py = sys.executable
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(cmd: list[str], port: int) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        _wait_port(port, 60)
        return p

    try:
        up = _port()
        spawn([py, "-m", f"{__package__}.upstream", str(up)], up)
        rport = _port()
        spawn(redis_command(rport, work), rport)
        print(f"{os.cpu_count()} cores shared by the generator, the upstream, Redis and Failgate; 64 connections, "
              f"{args.seconds:g}s per row")
        print(f"  {'workers':>7} {'route':<22} {'req/s':>8} {'CPU µs/req (all Failgate processes)':>36}")
        for n in counts:
            port, admin = _port(), _port()
            cfg = work / f"failgate-{n}.yaml"
            _failgate_config(cfg, port, admin, up, f"redis://127.0.0.1:{rport}/0")
            fg = spawn([py, "-m", "proxy", "run", "-c", str(cfg), "--workers", str(n)], port)
            try:
                deadline = time.monotonic() + 30
                while len(_tree(fg.pid)) < n + (1 if n > 1 else 0) and time.monotonic() < deadline:
                    time.sleep(0.1)
                for route, path in (("passthrough", "/pass"), ("rate_limit sliding", "/rl/sliding")):
                    url = f"http://127.0.0.1:{port}{path}"
                    run_load(Options(url, concurrency=64, duration=1.0, warmup=0.0, progress=False))
                    pids = _tree(fg.pid)
                    before = sum(_cpu_seconds(p) for p in pids)
                    result = run_load(Options(url, concurrency=64, duration=args.seconds, warmup=0.0,
                                              progress=False))
                    cpu = sum(_cpu_seconds(p) for p in pids) - before
                    per = cpu / result.requests * 1e6 if result.requests else float("nan")
                    print(f"  {n:>7} {route:<22} {result.requests / args.seconds:>8.0f} {per:>36.1f}", flush=True)
                rss = ", ".join(f"{_rss_mib(p):.0f}" for p in _tree(fg.pid))
                print(f"  {'':>7} resident memory after the runs, MiB (parent first when workers > 1): {rss}")
            finally:
                fg.terminate()
                fg.wait(30)
        return 0
    finally:
        stop_processes(procs, work)


if __name__ == "__main__":
    raise SystemExit(main())
