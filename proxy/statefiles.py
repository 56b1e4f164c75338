"""Files Failgate keeps between runs: the last-good config copy and the state directory (`--state-dir`).

The state directory keeps what lets a restart during a store outage still serve `stale`: each serving process's
remembered API-key answers (`keys-<n>.json`) and the revocations made on the admin listener
(`revocations.json`). Hashes only — never a key. Every file is written atomically (a temporary file in the same
directory, fsync, rename) with mode 0600, so a crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import tempfile
from typing import Any

import msgspec

log = logging.getLogger("failgate.state")


def write_private(path: str, data: bytes) -> None:
    """Atomically replace `path` with `data`, mode 0600. Raises OSError."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".failgate-", dir=directory)
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class KeysFile(msgspec.Struct):
    """A serving process's remembered API-key answers: [hash, record or null (revoked), at] each."""

    version: int
    entries: list[tuple[str, Any, float]]
    revoked: list[tuple[str, float]] = []


class RevocationsFile(msgspec.Struct):
    version: int
    revoked: list[tuple[str, float]]  # hash, when
    pending: list[str] = []  # revoked here, not yet written to the store


_KEYS = msgspec.json.Decoder(KeysFile)
_REVOCATIONS = msgspec.json.Decoder(RevocationsFile)
_encode = msgspec.json.Encoder().encode


class StateDir:
    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(path, mode=0o700, exist_ok=True)

    @staticmethod
    def default(state_dir: str | None, last_good: str | None) -> StateDir | None:
        """`--state-dir`, else the directory of `--last-good`, else none (nothing is kept)."""
        if state_dir is None and last_good is not None:
            state_dir = os.path.dirname(os.path.abspath(last_good))
        return StateDir(state_dir) if state_dir is not None else None

    # --- remembered API-key answers, one file per serving process ---------------------------------------------
    def save_keys(self, index: int, snapshot: KeysFile) -> None:
        write_private(os.path.join(self.path, f"keys-{index}.json"), _encode(snapshot))

    def load_keys(self) -> list[KeysFile]:
        """Every serving process's file (a restarted instance may run a different number of workers)."""
        out = []
        for path in sorted(glob.glob(os.path.join(self.path, "keys-*.json"))):
            try:
                with open(path, "rb") as f:
                    out.append(_KEYS.decode(f.read()))
            except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.error("state file %s is unusable, ignored: %s", path, exc)
        return out

    # --- revocations made on the admin listener ---------------------------------------------------------------
    def save_revocations(self, revoked: dict[str, float], pending: list[str]) -> None:
        data = RevocationsFile(1, sorted(revoked.items()), sorted(pending))
        write_private(os.path.join(self.path, "revocations.json"), _encode(data))

    def load_revocations(self) -> RevocationsFile:
        path = os.path.join(self.path, "revocations.json")
        try:
            with open(path, "rb") as f:
                return _REVOCATIONS.decode(f.read())
        except FileNotFoundError:
            return RevocationsFile(1, [])
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("state file %s is unusable, ignored: %s", path, exc)
            return RevocationsFile(1, [])
