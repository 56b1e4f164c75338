"""`python -m benchmarks load URL [...]` and `python -m benchmarks suite [--quick]`."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks") -> int:
    parser = argparse.ArgumentParser(prog=prog)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("load", help="load-test a URL (closed loop by default, open loop with --rate)")
    p.add_argument("url")
    p.add_argument("-c", "--concurrency", type=int, default=64, help="connections (default 64)")
    p.add_argument("-d", "--duration", type=float, default=10.0, help="seconds to measure (default 10)")
    p.add_argument("-r", "--rate", type=float, default=None, help="open loop: requests per second")
    p.add_argument("-H", "--header", action="append", default=[], help="'Name: value', repeatable")
    p.add_argument("-m", "--method", default="GET")
    p.add_argument("-b", "--body", default="", help="request body")
    p.add_argument("-p", "--procs", type=int, default=1, help="generator processes (default 1)")
    p.add_argument("-w", "--warmup", type=float, default=1.0, help="seconds before measuring (default 1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("suite", help="measure Failgate against direct and a reference proxy, healthy and in outages")
    p.add_argument("--quick", action="store_true", help="short runs (under 3 minutes)")
    p.add_argument("--out", default="failgate-bench",
                   help="directory for the Markdown and JSON results (default ./failgate-bench; created)")
    p.add_argument("--only", default=None, help="comma-separated scenario names to run")
    p.add_argument("--pin", action="store_true",
                   help="the proxy under test alone on one core, the generator and the rest on the others")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure the rows of the peer table this many times, in turn, and show their medians")

    args = parser.parse_args(argv)
    if args.command == "load":
        from .load import Options, format_report, run_load

        headers = []
        for h in args.header:
            name, sep, value = h.partition(":")
            if not sep:
                parser.error(f"--header expects 'Name: value', got {h!r}")
            headers.append((name.strip(), value.strip()))
        if args.procs < 1 or args.concurrency < args.procs:
            parser.error("--concurrency must be at least --procs, and --procs at least 1")
        opts = Options(args.url, concurrency=args.concurrency, duration=args.duration, rate=args.rate,
                       headers=headers, method=args.method.upper(), body=args.body.encode(), procs=args.procs,
                       warmup=args.warmup, progress=not args.json and sys.stderr.isatty())
        result = run_load(opts)
        if args.json:
            print(json.dumps(result.summary(), indent=2))
        else:
            print(format_report(result))
        return 0
    from .suite import run_suite

    if args.rounds < 1:
        parser.error("--rounds must be 1 or more")
    return run_suite(quick=args.quick, out=args.out, only=args.only.split(",") if args.only else None, pin=args.pin,
                     rounds=args.rounds)


if __name__ == "__main__":
    sys.exit(main())
