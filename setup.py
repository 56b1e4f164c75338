"""The optional compiled build. `pip install .` installs Failgate as plain Python; with FAILGATE_COMPILE=1 in the
environment (and mypy importable by the build: `pip install --no-build-isolation` in an environment that has it),
the modules every request runs through are compiled to C extensions by mypyc — the same source, type-checked, made
native. Everything else (configuration, CLI, admin) stays Python. README "Compiled build" says what it buys."""

import os

from setuptools import setup

# The request path: routing, the checks, the store client and the metrics they update. A module here must not
# subclass a class that is not compiled with it unless that class allows it, define a msgspec Struct (msgspec reads
# annotations a compiled module no longer has), use an async generator, or be patched by a test.
COMPILED = [
    "proxy/app.py",
    "proxy/compiled.py",
    "proxy/decision.py",
    "proxy/failmode.py",
    "proxy/keyspace.py",
    "proxy/pipeline.py",
    "proxy/routing.py",
    "proxy/timeouts.py",
    "proxy/checks/algorithms.py",
    "proxy/checks/auth.py",
    "proxy/checks/local.py",
    "proxy/checks/memo.py",
    "proxy/checks/ratelimit.py",
    "proxy/observe/decisionlog.py",
    "proxy/observe/metrics.py",
    "proxy/store/breaker.py",
    "proxy/store/chaos.py",
    "proxy/store/ops.py",
    "proxy/store/redis.py",
    "proxy/store/resp.py",
]

ext_modules = []
if os.environ.get("FAILGATE_COMPILE") == "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(COMPILED, opt_level="3")

setup(ext_modules=ext_modules)
