"""Instructions per request, counted by valgrind's callgrind: a deterministic companion to the suite's CPU µs,
which move by tens of percent from run to run on shared cores.

    python -m benchmarks.instructions [--seconds 8] [--concurrency 8]

Runs the fast upstream, redis-server, the reference proxy and Failgate (each server in turn under callgrind with
instrumentation off), then for each scenario switches instrumentation on, drives load with the bundled generator,
switches it off and divides the instructions the server executed by the responses it served. Under callgrind a
server runs ~50x slower, so these are counts, not speeds; compare them with each other. They still move by a few
percent from run to run (how many requests share an event-loop turn depends on timing): `--rounds N` measures
every scenario N times, interleaved, and reports the median. Last, redis-server is SIGKILLed and the stale-auth and
open routes are measured again: what a request decided by its route's fail mode costs next to a real check."""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .load import Options, run_load
from .suite import (
    ROOT,
    _failgate_config,
    _jwt_tokens,
    _port,
    _seed_key,
    _wait_port,
    build,
    redis_command,
    stop_processes,
)


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True)


def _measure(pid: int, out: Path, url: str, seconds: float, concurrency: int,
             headers: list[tuple[str, str]], rotate: list[tuple[str, str]] | None = None) -> tuple[int, int, Path]:
    """(instructions, responses, callgrind's dump) for one scenario."""
    # warm the path (imports, caches, pooled connections; every rotated token seen once) before counting
    run_load(Options(url, concurrency=8 if rotate else 1, duration=8.0 if rotate else 0.5, warmup=0.0,
                     progress=False, headers=headers, rotate=rotate or []))
    _control("-z", str(pid))
    _control("-i", "on", str(pid))
    result = run_load(Options(url, concurrency=concurrency, duration=seconds, warmup=0.0, progress=False,
                              headers=headers, rotate=rotate or []))
    _control("-i", "off", str(pid))
    before = set(out.parent.glob(out.name + ".*"))
    _control("-d", str(pid))
    for _ in range(100):
        new = set(out.parent.glob(out.name + ".*")) - before
        if new:
            break
        time.sleep(0.1)
    dump = max(new, key=lambda p: p.stat().st_mtime)
    time.sleep(0.2)
    total = int(re.search(r"^totals: (\d+)", dump.read_text(), re.M).group(1))  # type: ignore[union-attr]
    return total, result.requests, dump


_ANNOTATED = re.compile(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S.*)$")


def _costs(dump: Path, inclusive: bool) -> dict[str, int]:
    """Instructions by function (self or inclusive cost) from callgrind_annotate."""
    text = subprocess.run(["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", "--auto=no",
                           "--threshold=100", str(dump)],
                          check=True, capture_output=True, text=True).stdout
    costs: dict[str, int] = {}
    for line in text.splitlines():
        m = _ANNOTATED.match(line)
        if m and "PROGRAM TOTALS" not in line and not m.group(2).startswith("=>"):
            name = m.group(2)
            costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs


def _profile(runs: dict[str, list[tuple[int, int, Path]]], top: int) -> None:
    """Per scenario, the functions whose instructions per request grew most over passthrough's (last round): by
    self cost, and by inclusive cost among compiled functions (mypyc's CPyDef_, Cython's __pyx_: aiohttp, uvloop),
    which name what Python code ran in a compiled build."""
    _, base_n, base_dump = runs["failgate passthrough"][-1]
    kept = Path(tempfile.mkdtemp(prefix="failgate-profile-"))
    for name, results in runs.items():
        shutil.copy(results[-1][2], kept / (re.sub(r"[^a-z0-9]+", "-", name).strip("-") + ".cg"))
    print(f"callgrind's dumps (for callgrind_annotate --tree=calling, kcachegrind): {kept}")
    for inclusive in (False, True):
        base = {k: v / base_n for k, v in _costs(base_dump, inclusive).items()}
        for name, results in runs.items():
            if not name.startswith("failgate") or name == "failgate passthrough":
                continue
            _, n, dump = results[-1]
            costs = {k: v / n for k, v in _costs(dump, inclusive).items()}
            names = set(costs) | set(base)
            if inclusive:
                names = {k for k in names if "CPyDef_" in k or "__pyx_" in k}
            diff = sorted(((costs.get(k, 0.0) - base.get(k, 0.0), k) for k in names), reverse=True)
            print(f"\n{name}: instructions per request over passthrough, by function "
                  f"({'inclusive cost, compiled functions' if inclusive else 'self cost'})")
            for d, k in diff[:top]:
                print(f"  {d:9.0f}  {k.split(' [')[0][-120:]}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated words: only the Failgate scenarios whose "
                        "names contain one (the reference proxy is always measured)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="also list, per scenario, the N "
                        "functions that cost most per request over passthrough, by self cost and by inclusive cost "
                        "of compiled functions, and keep callgrind's dumps")
    args = parser.parse_args()
    only = [w for w in args.only.split(",") if w]
    if not shutil.which("valgrind"):
        print("valgrind is not installed", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="failgate-instr-"))
    py = sys.executable
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(cmd: list[str], port: int, timeout: float = 120.0) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        _wait_port(port, timeout)
        return p

    try:
        up = _port()
        spawn([py, "-m", f"{__package__}.upstream", str(up)], up)
        three = [_port() for _ in range(3)]  # a three-target upstream, to weigh balancing against one target
        for p in three:
            spawn([py, "-m", f"{__package__}.upstream", str(p)], p)
        rport = _port()
        store = spawn(redis_command(rport, work), rport)
        key = _seed_key(f"redis://127.0.0.1:{rport}/0")
        bearer = [("Authorization", f"Bearer {key}")]
        runs: dict[str, list[tuple[int, int, Path]]] = {}

        def measure(name: str, pid: int, out: Path, url: str, hdrs: list[tuple[str, str]],
                    rotate: list[tuple[str, str]] | None = None) -> None:
            runs.setdefault(name, []).append(_measure(pid, out, url, args.seconds, args.concurrency, hdrs, rotate))

        ref_port = _port()
        out = work / "ref.cg"
        ref = spawn(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                     py, "-m", f"{__package__}.refproxy", str(ref_port), f"http://127.0.0.1:{up}"], ref_port)
        ref2_port = _port()
        out2 = work / "ref2.cg"
        ref2 = spawn(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out2}",
                      py, "-m", f"{__package__}.refproxy", str(ref2_port), f"http://127.0.0.1:{up}",
                      f"redis://127.0.0.1:{rport}/0"], ref2_port)
        fg_port, fg_admin = _port(), _port()
        cfg = work / "failgate.yaml"
        tokens = _jwt_tokens(work / "jwks.json", 1000)
        _failgate_config(cfg, fg_port, fg_admin, up, f"redis://127.0.0.1:{rport}/0", jwks_file=work / "jwks.json",
                         three=three)
        # callgrind is slow (~50x): no spurious timeouts of the store or the authorizer, and the authorizer's
        # cache_for as long as the API key's (5 s here is 0.1 s of real time: its refreshes would be measured)
        text = cfg.read_text().replace("timeout: 50ms", "timeout: 5s").replace("timeout: 100ms", "timeout: 5s")
        text = text.replace("cache_for: 5s", "cache_for: 60s")
        cfg.write_text(text)
        out3 = work / "fg.cg"
        fg = spawn(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out3}",
                    py, "-m", "proxy", "run", "-c", str(cfg)], fg_port)
        base = f"http://127.0.0.1:{fg_port}"
        scenarios = (("failgate passthrough", "/pass", []), ("failgate passthrough, 3 targets", "/pass3", []),
                     ("failgate rate_limit sliding", "/rl/sliding", []),
                     ("failgate two limits, one key", "/rl/two", []),
                     ("failgate auth", "/auth", bearer), ("failgate auth + rate_limit", "/auth-rl", bearer),
                     ("failgate auth from cache_for", "/auth-cached", bearer),
                     ("failgate http authorizer, cache_for", "/authz-cached", bearer),
                     ("failgate stale auth + rate_limit", "/gate-stale", bearer),
                     ("failgate open rate_limit", "/open", []))
        for _ in range(args.rounds):
            measure("reference proxy", ref.pid, out, f"http://127.0.0.1:{ref_port}/x", [])
            measure("reference proxy + 1 store call", ref2.pid, out2, f"http://127.0.0.1:{ref2_port}/x", [])
            for name, path, hdrs in scenarios:
                if not only or any(w in name for w in only) or name == "failgate passthrough":
                    measure(name, fg.pid, out3, base + path, hdrs)
            if not only or "jwt" in only:
                measure("failgate jwt, 1,000 tokens", fg.pid, out3, base + "/jwt", [], tokens)
        # the store SIGKILLed: what a request decided by its route's fail mode costs (last: the store stays down)
        outage = [(name, path, hdrs) for name, path, hdrs in scenarios
                  if path in ("/gate-stale", "/open") and (not only or any(w in name for w in only))]
        if outage:
            store.kill()
            store.wait()
            for _ in range(args.rounds):
                for name, path, hdrs in outage:
                    measure(name + ", store killed", fg.pid, out3, base + path, hdrs)
        rows = [(name, statistics.median(total / n for total, n, _ in results if n), sum(n for _, n, _ in results))
                for name, results in runs.items()]
        print(f"instructions per request (callgrind), Failgate {build()}, {args.concurrency} connections, "
              f"{args.seconds:g}s each, median of {args.rounds}")
        base_per = ref_per = 0.0
        width = max(len(name) for name, _, _ in rows)
        for name, per, n in rows:
            if name == "failgate passthrough":
                base_per = per
            if name == "reference proxy":
                ref_per = per
            healthy = name.removesuffix(", store killed")
            if healthy != name and healthy in runs:
                extra = f"  ({per / statistics.median(t / k for t, k, _ in runs[healthy] if k):.2f}x healthy)"
            elif base_per and name != "failgate passthrough" and name.startswith("failgate"):
                extra = f"  (+{(per - base_per) / 1000:.0f}k over passthrough)"
            elif name == "reference proxy + 1 store call":
                extra = f"  (+{(per - ref_per) / 1000:.0f}k over the reference proxy)"
            else:
                extra = ""
            each = " ".join(f"{total / k / 1000:.0f}k" for total, k, _ in runs[name] if k)
            print(f"  {name:<{width}} {per / 1000:8.0f}k  over {n} responses{extra}  [{each}]")
        if args.profile:
            _profile(runs, args.profile)
        return 0
    finally:
        stop_processes(procs, work)


if __name__ == "__main__":
    sys.exit(main())
