"""The plain and the compiled build side by side: `python -m benchmarks.builds [--rounds 6] [--seconds 3]`

Starts the fast upstream, redis-server and two Failgate processes on the same config — the checkout's plain
Python and the compiled build in `build/compiled` (made by `tests/compiled`, or by unpacking a wheel built with
FAILGATE_COMPILE=1 there) — both pinned to the first core, everything else on the others. Then, round after round,
drives 64 connections at each route of the peer table (passthrough, rate limit, auth, auth + rate limit) on one
build and then the other, and reports the median CPU microseconds per request of each build's process and their
ratio. Taking turns, many times, is what makes a 10 % difference visible on a machine whose speed drifts by more
than that within a minute."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .load import Options, run_load
from .suite import ROOT, _cpu_seconds, _failgate_config, _port, _seed_key, _wait_port, redis_command, stop_processes

ROUTES = (("passthrough", "/pass", False), ("rate limit (sliding window)", "/rl/sliding", False),
          ("auth (API key)", "/auth", True), ("auth + rate limit", "/auth-rl", True))


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.builds", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--compiled", default=str(ROOT / "build" / "compiled"),
                    help="where the compiled build is unpacked (default build/compiled)")
    args = ap.parse_args()
    compiled = Path(args.compiled).resolve()
    if not list(compiled.glob("proxy/app.*.so")):
        print(f"no compiled build in {compiled}: run tests/compiled (or unpack a FAILGATE_COMPILE=1 wheel there)",
              file=sys.stderr)
        return 1
    cores = sorted(os.sched_getaffinity(0))
    pin = cores[0] if len(cores) > 1 else None
    if pin is not None:
        os.sched_setaffinity(0, set(cores[1:]))
    work = Path(tempfile.mkdtemp(prefix="failgate-builds-"))
    py = sys.executable
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(cmd: list[str], port: int, env: dict[str, str] | None = None, pinned: bool = False) -> int:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                             preexec_fn=(lambda: os.sched_setaffinity(0, {pin})) if pinned and pin is not None
                             else None)
        procs.append(p)
        _wait_port(port, 60)
        return p.pid

    try:
        up = _port()
        spawn([py, "-m", f"{__package__}.upstream", str(up)], up)
        rport = _port()
        spawn(redis_command(rport, work), rport)
        key = _seed_key(f"redis://127.0.0.1:{rport}/0")
        plain_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
        compiled_env = {**plain_env, "PYTHONPATH": f"{compiled}{os.pathsep}{ROOT}", "PYTHONSAFEPATH": "1"}
        builds: dict[str, tuple[int, int]] = {}  # build -> (pid, port)
        for name, env in (("plain", plain_env), ("compiled", compiled_env)):
            cfg = work / f"{name}.yaml"
            port = _port()
            _failgate_config(cfg, port, _port(), up, f"redis://127.0.0.1:{rport}/0")
            builds[name] = (spawn([py, "-m", "proxy", "run", "-c", str(cfg)], port, env, pinned=True), port)
        cpu: dict[tuple[str, str], list[float]] = {}
        print(f"{len(cores)} cores; each Failgate on core {pin}, the generator, upstream and Redis on the rest; "
              f"64 connections, {args.seconds:g}s per row, {args.rounds} rounds")
        for n in range(args.rounds):
            for label, path, bearer in ROUTES:
                for name, (pid, port) in builds.items():
                    before = _cpu_seconds(pid)
                    result = run_load(Options(f"http://127.0.0.1:{port}{path}", concurrency=64,
                                              duration=args.seconds, warmup=0.5, progress=False,
                                              headers=[("Authorization", f"Bearer {key}")] if bearer else []))
                    served = result.requests * (1 + 0.5 / args.seconds)  # (CPU counts the warm-up too)
                    if set(result.statuses) != {200}:
                        print(f"  {name} {label}: statuses {result.statuses}", file=sys.stderr)
                    cpu.setdefault((label, name), []).append((_cpu_seconds(pid) - before) * 1e6 / served)
            print(f"  round {n + 1} of {args.rounds} done", flush=True)
        print(f"{'':<30} {'plain µs':>9} {'compiled µs':>12} {'compiled/plain':>15}")
        medians = {k: statistics.median(v) for k, v in cpu.items()}
        for label, _, _ in ROUTES:
            plain, comp = medians[(label, "plain")], medians[(label, "compiled")]
            print(f"{label:<30} {plain:>9.1f} {comp:>12.1f} {comp / plain:>15.2f}")
        base = {name: medians[("passthrough", name)] for name in builds}
        for label, _, _ in ROUTES[1:]:
            print(f"{label + ' over passthrough':<30} {medians[(label, 'plain')] - base['plain']:>+9.1f} "
                  f"{medians[(label, 'compiled')] - base['compiled']:>+12.1f}")
        return 0
    finally:
        stop_processes(procs, work)


if __name__ == "__main__":
    sys.exit(main())
