"""A real Sentinel set for tests: a master, a replica and three sentinels (`redis-server --sentinel`), each its own
process on a loopback port, so a test can SIGKILL the master and watch the sentinels promote the replica."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.certs import CA
from tests.helpers import free_port
from tests.redis_server import RedisServer, raw_command

MASTER = "failgate-master"


class Sentinel:
    def __init__(self, workdir: Path, master_port: int, password: str | None = None,
                 master_password: str | None = None, tls: list[str] | None = None) -> None:
        self.password = password
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "sentinel.log"
        self.port = free_port()
        self.conf = workdir / "sentinel.conf"
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {workdir}\nlogfile {self.log}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 500\n"
            f"sentinel failover-timeout {MASTER} 5000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
            + (f"requirepass {password}\n" if password else "")
            + (f"sentinel auth-pass {MASTER} {master_password}\n" if master_password else "")
            + ("".join(f"{k} {v}\n" for k, v in zip(tls[0::2], tls[1::2], strict=True)) if tls else ""))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sentinel:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (tests/run installs it)"
        self.proc = subprocess.Popen([binary, str(self.conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        return self

    def command(self, *args: str) -> bytes:
        return raw_command(self.port, args, self.password)

    def master_port(self) -> int | None:
        try:
            reply = self.command("SENTINEL", "get-master-addr-by-name", MASTER)
        except OSError:
            return None
        parts = reply.split(b"\r\n")
        return int(parts[4]) if len(parts) > 4 and parts[4].isdigit() else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class SentinelSet:
    """`password`: the data nodes' (requirepass, masterauth); `sentinel_password`: the sentinels' own."""

    def __init__(self, workdir: Path, password: str | None = None, sentinel_password: str | None = None,
                 tls: bool = False) -> None:
        auth = ["--requirepass", password, "--masterauth", password] if password else []
        self.password, self.sentinel_password = password, sentinel_password
        self.ca = None
        tls_args: list[str] = []  # the data nodes speak TLS only; the sentinels reach them over TLS
        if tls:
            workdir.mkdir(parents=True, exist_ok=True)
            self.ca = CA(workdir)
            leaf = self.ca.issue("redis")
            tls_args = ["tls-cert-file", str(leaf.cert), "tls-key-file", str(leaf.key), "tls-ca-cert-file",
                        str(self.ca.cert), "tls-auth-clients", "no", "tls-replication", "yes"]
        node = [f"--{a}" if i % 2 == 0 else a for i, a in enumerate(tls_args)]
        ports = [free_port(), free_port()]
        plain = (lambda p: ["--port", "0", "--tls-port", str(p)]) if tls else (lambda p: [])
        ca_file = self.ca.cert if self.ca is not None else None
        self.master = RedisServer(workdir / "master", port=ports[0], extra=[*auth, *node, *plain(ports[0])],
                                  password=password, tls_ca=ca_file)
        self.replica = RedisServer(workdir / "replica", port=ports[1],
                                   extra=["--replicaof", "127.0.0.1", str(ports[0]), *auth, *node, *plain(ports[1])],
                                   password=password, tls_ca=ca_file)
        self.sentinels = [Sentinel(workdir / f"sentinel{i}", self.master.port, sentinel_password, password,
                                   tls_args or None) for i in range(3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        auth = f":{self.password}@" if self.password else ""
        query = [f"sentinel_password={self.sentinel_password}"] if self.sentinel_password else []
        if self.ca is not None:
            query.append(f"ssl_ca_certs={self.ca.cert}")
        scheme = "rediss+sentinel" if self.ca is not None else "redis+sentinel"
        return f"{scheme}://{auth}{hosts}/{MASTER}/0" + ("?" + "&".join(query) if query else "")

    def start(self) -> SentinelSet:
        self.master.start()
        self.replica.start()
        for s in self.sentinels:
            s.start()
        deadline = time.monotonic() + 20
        while not self.ready():
            assert time.monotonic() < deadline, "the sentinel set did not come up"
            time.sleep(0.05)
        return self

    def ready(self) -> bool:
        """Every sentinel knows the master, its replica and the other two sentinels; the replica is in sync."""
        for s in self.sentinels:
            try:
                info = s.command("SENTINEL", "master", MASTER)
            except OSError:
                return False
            fields = info.split(b"\r\n")[2::2]
            state = dict(zip(fields[0::2], fields[1::2], strict=False))
            if state.get(b"num-slaves") != b"1" or state.get(b"num-other-sentinels") != b"2":
                return False
        return b"master_link_status:up" in self.replica.command("INFO", "replication")

    def current_master_port(self) -> int | None:
        ports = {s.master_port() for s in self.sentinels}
        return ports.pop() if len(ports) == 1 else None

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        self.replica.stop()
        self.master.stop()

    def logs(self, lines: int = 60) -> str:
        """The end of each sentinel's log (elections, votes, +switch-master), for a failed test's report."""
        out = []
        for i, s in enumerate(self.sentinels):
            text = s.log.read_text(errors="replace").splitlines()[-lines:] if s.log.exists() else ["(no log)"]
            out.append(f"--- sentinel {i} (port {s.port}) ---\n" + "\n".join(text))
        return "\n".join(out)
