"""Command line: `failgate run | check | keys | demo`. `python -m proxy` is the same program."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from .config import ConfigError, load_file

# In a checkout, its example; anywhere else, what `failgate init` writes.
DEFAULT_CONFIG = "config/failgate.yaml" if os.path.exists("config/failgate.yaml") else "failgate.yaml"


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )


def cmd_check(args: argparse.Namespace) -> int:
    from .checkcmd import describe, warnings

    files = [*args.files, *args.config]
    if not files:
        print("error: name a config file: failgate check FILE (or -c FILE)", file=sys.stderr)
        return 2
    status = 0
    for file in files:
        try:
            loaded = load_file(file)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
            continue
        print(describe(loaded))
        if args.strict and warnings(loaded):
            print(f"{file}: warnings are errors with --strict", file=sys.stderr)
            status = 1
    return status


def cmd_run(args: argparse.Namespace) -> int:
    from .config.values import port_in_use, resolve_workers
    from .reload import ConfigState
    from .server import run

    _setup_logging(args.verbose)
    state = ConfigState(args.config, args.last_good)
    try:
        loaded = state.load_initial()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.workers is not None and args.workers < 1:
        print("error: --workers must be 1 or more", file=sys.stderr)
        return 1
    workers = args.workers or resolve_workers(loaded.config.workers)
    if workers > 1 and loaded.config.store.url.startswith("memory://"):
        print(f"error: {loaded.source}: workers: memory:// keeps state inside one process and needs 1 worker "
              f"(--workers {workers} given)", file=sys.stderr)
        return 1
    from .statefiles import StateDir

    try:
        state_dir = StateDir.default(args.state_dir, args.last_good)
    except OSError as exc:
        print(f"error: --state-dir: cannot use {args.state_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    cfg = loaded.config
    for what, host, port in (("listen", cfg.listen.host, cfg.listen.port), ("admin", cfg.admin.host, cfg.admin.port)):
        busy = port_in_use(host, port)
        if busy is not None:
            print(f"error: cannot listen ({what}) on {busy} — is another Failgate running there?", file=sys.stderr)
            return 1
    try:
        run(state, workers, state_dir)
    except OSError as exc:
        print(f"error: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from . import keys

    try:
        loaded = load_file(args.config)
        if args.keys_command == "add":
            scopes = [s.strip() for s in args.scopes.split(",") if s.strip()] if args.scopes else []
            key, digest = keys.add(loaded, args.principal, scopes, args.expires, args.plan)
            print(key)
            print(f"stored for {args.principal} (hash {digest[:12]}…); this key is shown once and never again",
                  file=sys.stderr)
        elif args.keys_command == "revoke":
            digest = keys.revoke(loaded, args.key)
            print(f"revoked {digest[:12]}… (routes with auth.cache_for may accept it until their cache expires)")
        elif args.keys_command == "migrate":
            print(f"moved {keys.migrate(loaded)} key record(s) to the Cluster layout")
        else:
            print(keys.format_list(keys.list_keys(loaded)))
    except (ConfigError, keys.KeysError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the instance the config describes answers /readyz with 200 (a worker is ready and it is not
    draining), 1 otherwise — for a container's HEALTHCHECK, which then needs no port written into it."""
    import json
    import urllib.error
    import urllib.request

    try:
        cfg = load_file(args.config).config
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    host = "127.0.0.1" if cfg.admin.host in ("0.0.0.0", "::", "") else cfg.admin.host.strip("[]")
    url = f"http://{host if ':' not in host else f'[{host}]'}:{cfg.admin.port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as r:
            print(f"ready: {url}")
            return 0 if r.status == 200 else 1
    except urllib.error.HTTPError as exc:
        detail = json.loads(exc.read() or b"{}")
        print(f"not ready: {url} answered {exc.code} (draining: {detail.get('draining')}, workers ready: "
              f"{(detail.get('workers') or {}).get('ready')})", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"not ready: {url}: {exc}", file=sys.stderr)
    return 1


def cmd_init(args: argparse.Namespace) -> int:
    """Write a commented starter config (the bundled example) in the current directory; never overwrite."""
    from importlib import resources

    target = args.path
    if os.path.exists(target):
        print(f"error: {target} exists; not overwriting it (give another path: failgate init OTHER.yaml)",
              file=sys.stderr)
        return 1
    text = resources.files("proxy").joinpath("resources/examples/failgate.yaml").read_text()
    with open(target, "x") as f:
        f.write(text)
    examples = resources.files("proxy").joinpath("resources/examples")
    print(f"""wrote {target}: an API with a public search, payments and an admin area, each with its fail mode.
Next:
  failgate check {target}            # what it will do, route by route
  failgate run -c {target}           # serve it (point `upstreams` at your services first)
  failgate keys add -c {target} --principal alice --scopes payments:write   # an API key (a redis:// store)
  failgate bench load http://127.0.0.1:8080/search -c 64 -d 10   # load-test it
More examples: {", ".join(sorted(p.name for p in examples.iterdir() if p.name != "failgate.yaml"))} in
{examples} — and README.md.""")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """The bundled benchmarks (`failgate bench load|suite …`): `failgate_bench` when installed from the wheel,
    the checkout's `benchmarks` when run from a checkout."""
    try:
        from failgate_bench.__main__ import main as bench
    except ImportError:
        from benchmarks.__main__ import main as bench
    return bench(args.rest, prog="failgate bench")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _setup_logging(args.verbose)
    return run_demo()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="failgate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"failgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="serve the proxy")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    p.add_argument("--workers", type=int, default=None, help="override `workers` from the config")
    p.add_argument("--last-good", default=None, metavar="PATH",
                   help="keep a copy of every accepted config here; start from it when the file is invalid")
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="keep remembered API-key answers and admin revocations here, so a restart during a store "
                        "outage still serves stale (default: the directory of --last-good; none without either)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="validate configs and print what they do")
    p.add_argument("files", nargs="*", metavar="FILE")
    p.add_argument("-c", "--config", action="append", default=[], metavar="FILE", help="a config file (repeatable)")
    p.add_argument("--strict", action="store_true", help="exit 1 when there is any warning (for CI)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("keys", help="manage API keys in the config's store")
    keys_sub = p.add_subparsers(dest="keys_command", required=True)
    k = keys_sub.add_parser("add", help="create a key; prints it once")
    k.add_argument("--principal", required=True, help="who the key belongs to (sent upstream as X-Failgate-Principal)")
    k.add_argument("--scopes", default="", help="comma-separated scopes the key grants, such as payments:write")
    k.add_argument("--expires", default=None, help="a duration such as 30d (default: never)")
    k.add_argument("--plan", default=None, help="the plan whose quotas apply to it, for limits with `plans`")
    k.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    k = keys_sub.add_parser("revoke", help="revoke a key everywhere (the key, its hash, or a unique hash prefix)")
    k.add_argument("key")
    k.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    k = keys_sub.add_parser("list", help="principal, scopes, plan, expiry and hash prefix of every key")
    k.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    k = keys_sub.add_parser("migrate", help="move records copied from a single Redis to a Cluster's layout")
    k.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("init", help="write a commented starter failgate.yaml here (never overwrites)")
    p.add_argument("path", nargs="?", default="failgate.yaml")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("bench", help="the bundled benchmarks: bench load URL …, bench suite [--quick] [--out DIR]",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("health", help="exit 0 when the running instance is ready (for a container HEALTHCHECK)")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for /readyz (default 2)")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("demo", help="run an echo upstream and the proxy with config/demo.yaml on memory://")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_demo)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:  # internal: a worker started by the supervising parent
        from .server import run_worker

        _setup_logging()
        run_worker()
        return 0
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`failgate check F | head`): not an error worth a traceback. Point stdout at
        # /dev/null so the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
