"""Auth + rate limit against a three-master Redis Cluster and against a single Redis, in one run:
`python -m benchmarks.cluster [--concurrency 64] [--seconds 5]`

Starts the fast upstream, one redis-server, three cluster-enabled redis-servers joined with `redis-cli --cluster
create` (masters only), and two Failgate processes that differ only in `store.url`. Each gets the same load on a
route with API-key auth and a rate limit. Reported: requests/s and Failgate's CPU µs per request (from /proc), so
the cost of grouping a request's operations per node — a request's record and its rate-limit counter live in
different slots, often on different masters — is read as a ratio of one run."""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .load import Options, run_load
from .ports import free_port
from .suite import ROOT, _cpu_seconds, _wait_port


def _config(path: Path, port: int, admin: int, upstream: int, store: str) -> None:
    path.write_text(f"""version: 1
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}}}
store: {{url: "{store}", timeout: 200ms}}
upstreams: {{api: {{url: "http://127.0.0.1:{upstream}"}}}}
routes:
  - name: auth-rl
    match: {{path: /auth-rl, prefix: true}}
    upstream: api
    auth: {{type: api_key, scheme: Bearer, on_store_error: closed}}
    rate_limit: {{limit: 1000000000, per: 1m, key: client_ip, on_store_error: open}}
""")


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported (default 3)")
    args = ap.parse_args()
    redis_server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not redis_server or not cli:
        print("needs redis-server and redis-cli", file=sys.stderr)
        return 1
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="failgate-cluster-") as work:
        try:
            def spawn(cmd: list[str], port: int) -> subprocess.Popen[bytes]:
                p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                procs.append(p)
                _wait_port(port, 30)
                return p

            up = free_port()
            spawn([sys.executable, "-m", f"{__package__}.upstream", str(up)], up)
            single = free_port()
            spawn([redis_server, "--port", str(single), "--save", "", "--dir", work], single)
            masters = [free_port() for _ in range(3)]
            for i, port in enumerate(masters):
                node = Path(work) / f"node{i}"
                node.mkdir()
                spawn([redis_server, "--port", str(port), "--save", "", "--dir", str(node), "--cluster-enabled",
                       "yes", "--cluster-port", str(free_port())], port)
            subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in masters), "--cluster-yes"],
                           check=True, capture_output=True, timeout=60)
            stores = {"single Redis": f"redis://127.0.0.1:{single}/0",
                      "3-master Cluster": "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in masters) + "/"}
            from proxy.config import load_file
            from proxy.keys import add

            targets = []
            for name, store in stores.items():
                port, admin = free_port(), free_port()
                cfg = Path(work) / f"{port}.yaml"
                _config(cfg, port, admin, up, store)
                for _ in range(100):  # (the cluster settles its slots a moment after create)
                    try:
                        key, _ = add(load_file(str(cfg)), "bench", [], None)
                        break
                    except Exception:
                        time.sleep(0.1)
                fg = spawn([sys.executable, "-m", "proxy", "run", "-c", str(cfg)], port)
                url = f"http://127.0.0.1:{port}/auth-rl"
                headers = [("Authorization", f"Bearer {key}")]
                run_load(Options(url, concurrency=8, duration=1.0, progress=False, headers=headers))
                targets.append((name, fg, url, headers))
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in stores}
            statuses: dict[str, dict[int, int]] = {name: {} for name in stores}
            for _ in range(args.rounds):  # interleaved: both see the same machine, round by round
                for name, fg, url, headers in targets:
                    before = _cpu_seconds(fg.pid)
                    result = run_load(Options(url, concurrency=args.concurrency, duration=args.seconds,
                                              progress=False, headers=headers))
                    cpu = (_cpu_seconds(fg.pid) - before) / max(result.requests, 1) * 1e6
                    samples[name].append((result.rps, cpu))
                    for status, n in result.statuses.items():
                        statuses[name][status] = statuses[name].get(status, 0) + n
            print(f"auth + rate limit, {args.concurrency} connections, {args.seconds:g}s each, median of {args.rounds} "
                  "interleaved rounds")
            base = statistics.median(cpu for _, cpu in samples["single Redis"])
            for name, got in samples.items():
                rps, cpu = statistics.median(r for r, _ in got), statistics.median(c for _, c in got)
                each = " ".join(f"{c:.0f}" for _, c in got)
                print(f"  {name:<18} {rps:9.0f} req/s  failgate {cpu:6.1f} µs/req ({cpu / base:.2f}x) [{each}]  "
                      f"{statuses[name]}")
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
