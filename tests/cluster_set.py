"""A real Redis Cluster for tests: three masters and three replicas (`redis-server --cluster-enabled yes`, joined
with `redis-cli --cluster create`), each its own process on a loopback port, so a test can SIGKILL a master and
watch its replica take over."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.helpers import free_port
from tests.redis_server import RedisServer


class ClusterSet:
    def __init__(self, workdir: Path, masters: int = 3, failover: bool = True) -> None:
        # The cluster bus port is given (by default it is the port + 10000, which may be taken or past 65535).
        self.nodes = [RedisServer(workdir / f"node{i}", extra=[
            "--cluster-enabled", "yes", "--cluster-config-file", str(workdir / f"node{i}" / "nodes.conf"),
            "--cluster-port", str(free_port()), "--cluster-node-timeout", "1000",
            "--cluster-replica-validity-factor", "0", "--cluster-require-full-coverage", "no",
            "--cluster-replica-no-failover", "no" if failover else "yes"])
            for i in range(masters * 2)]
        self.masters = masters

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:self.masters]) + "/"

    def start(self) -> ClusterSet:
        for n in self.nodes:
            n.start()
        cli = shutil.which("redis-cli")
        assert cli, "redis-cli is not installed (tests/run installs redis-tools)"
        done = subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                               "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, timeout=60)
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
        deadline = time.monotonic() + 30
        while not self.ok():
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.05)
        return self

    def ok(self) -> bool:
        """Every node sees the cluster state ok, and every replica is in sync with its master."""
        for n in self.nodes:
            if n.proc is None or n.proc.poll() is not None:
                continue
            try:
                if b"cluster_state:ok" not in n.command("CLUSTER", "INFO"):
                    return False
                info = n.command("INFO", "replication")
            except OSError:
                return False
            if b"role:slave" in info and b"master_link_status:up" not in info:
                return False
        return True

    def role(self, node: RedisServer) -> str:
        info = node.command("INFO", "replication").decode()
        return "master" if "role:master" in info else "replica"

    def master_of_slot(self, slot: int) -> RedisServer:
        for n in self.nodes:
            if n.proc is None or n.proc.poll() is not None or self.role(n) != "master":
                continue
            for line in n.command("CLUSTER", "NODES").decode().splitlines():
                fields = line.split()
                if len(fields) < 8 or "myself" not in fields[2]:  # (the bulk reply's length line)
                    continue
                for part in fields[8:]:
                    lo, _, hi = part.partition("-")
                    if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                        return n
        raise AssertionError(f"no live master serves slot {slot}")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
