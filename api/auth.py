"""API keys: stored hashed in a file of the state folder, checked from an in-memory cache.

A key is `mlops_` + 43 URL-safe characters (32 random bytes). Only its sha256 is stored, with a
name, scopes and dates, in a JSON file (mode 600; `APISettings.keys_file`, else
`<state>/api/keys.json`). A fast hash is enough for a long random key (no dictionary to
attack), and it keeps the check to one dict lookup: the service re-reads the file only when its
copy is older than `key_cache_seconds` (at most 5 s) and the file changed, so a request never
waits on a database or on Prefect, and a revoked key stops working within that time.

Scopes: `read` (GETs and predictions), `write` (control-plane writes and outcomes), `admin`
(keys and schedules). `admin` includes `write`, which includes `read`.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

Scope = Literal["read", "write", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "write", "admin")
KEY_PREFIX = "mlops_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def grants(scopes: list[str], required: str) -> bool:
    """Whether a key with `scopes` may do what needs `required` (admin > write > read)."""
    rank = max((SCOPES.index(s) for s in scopes if s in SCOPES), default=-1)
    return rank >= SCOPES.index(required)


@dataclass
class KeyRecord:
    name: str
    sha256: str
    scopes: list[str]
    created_at: str
    revoked_at: str | None = None

    @property
    def key_id(self) -> str:
        return self.sha256[:12]

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class KeyFile:
    """The keys file: read, and written atomically with owner-only permissions."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> list[KeyRecord]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        return [KeyRecord(**k) for k in raw.get("keys", [])]

    def write(self, records: list[KeyRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"keys": [r.__dict__ for r in records]}, out, indent=1)
        os.replace(tmp, self.path)

    def create(self, name: str, scopes: list[str]) -> tuple[str, KeyRecord]:
        """A new key (returned once, never stored) and its record."""
        name = name.strip()
        if not name:
            raise ValueError("a key needs a name (who or what uses it)")
        unknown = [s for s in scopes if s not in SCOPES]
        if unknown or not scopes:
            raise ValueError(f"scopes must be some of {', '.join(SCOPES)}; got {scopes}")
        records = self.read()
        if any(r.name == name and r.active for r in records):
            raise ValueError(f"an active key named {name!r} exists; revoke it first or pick "
                             "another name")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(name=name, sha256=hash_key(key),
                           scopes=sorted(set(scopes), key=SCOPES.index), created_at=_now())
        self.write(records + [record])
        return key, record

    def revoke(self, name_or_id: str) -> KeyRecord:
        records = self.read()
        hits = [r for r in records if r.active and name_or_id in (r.name, r.key_id)]
        if not hits:
            raise LookupError(f"no active key named {name_or_id!r} (or with that id); "
                              "`python -m api.keys list` shows them")
        for r in hits:
            r.revoked_at = _now()
        self.write(records)
        return hits[0]


@dataclass
class KeyCache:
    """Active keys by hash, re-read from the file when older than `ttl` seconds and changed."""

    path: Path
    ttl: float = 2.0
    _by_hash: dict[str, KeyRecord] = field(default_factory=dict)
    _checked: float = float("-inf")
    _signature: tuple | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def lookup(self, key: str) -> KeyRecord | None:
        now = time.monotonic()
        if now - self._checked > self.ttl:
            with self._lock:
                if now - self._checked > self.ttl:
                    self._refresh()
                    self._checked = now
        return self._by_hash.get(hash_key(key))

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            signature = None
        if signature == self._signature and self._by_hash is not None:
            return
        records = KeyFile(self.path).read() if signature else []
        self._by_hash = {r.sha256: r for r in records if r.active}
        self._signature = signature


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
