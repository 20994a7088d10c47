"""Persistent completion cache: a bounded in-memory LRU in front of an SQLite file in WAL mode.

Keys are SHA-256 hashes of a canonical JSON request (``cache_key``): backend, model, the messages,
the sampling parameters and the *sample index*, so that ``n`` samples at temperature > 0 are ``n``
distinct entries while a rerun of the same request is a hit. Secrets never enter the key: only what
``LM.cache_identity()`` returns does (backend and model; never an API key, never the base URL).

Safety
- Threads: one connection per process guarded by a lock; reads and writes are short transactions.
- Processes: WAL lets readers run beside one writer; ``busy_timeout`` makes a writer wait for another
  instead of failing; a forked child opens its own connection (connections never cross ``fork``).
- Corruption: a file that is not a database or fails ``PRAGMA quick_check`` at open, or any
  SQLITE_CORRUPT / SQLITE_NOTADB error later, moves the file (and its -wal/-shm) aside to
  ``<name>.corrupt-<time>-<pid>`` with a warning and starts a fresh one. If no cache file can be opened
  at all (read-only directory, ...), the cache warns once and runs memory-only. A cache problem never
  fails an LM call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sqlite3
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from optimas_fast._validate import check_int

__all__ = ["LMCache", "cache_key", "resolve_cache", "default_cache_dir", "default_cache_path"]

logger = logging.getLogger(__name__)

_SCHEMA = "CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)"
_CORRUPT_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB (primary codes; extended codes share the low byte)
_CORRUPT_WORDS = ("malformed", "not a database", "corrupt")


def default_cache_dir() -> Path:
    """``$OPTIMAS_FAST_CACHE_DIR`` if set, else the platform's user cache dir for optimas-fast."""
    env = os.environ.get("OPTIMAS_FAST_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs  # a declared dependency; imported here only to keep `import optimas_fast.lm` light

    return Path(platformdirs.user_cache_dir("optimas-fast"))


def default_cache_path() -> Path:
    return default_cache_dir() / "lm_cache.sqlite"


def cache_key(identity: Mapping[str, Any], prompt: Any, params: Mapping[str, Any], sample_index: int) -> str:
    """Stable hash of one request. ``identity`` is the backend's (backend, model, ...) without secrets."""
    payload = {"id": dict(identity), "prompt": prompt, "params": dict(params), "sample": int(sample_index)}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _is_busy(err: sqlite3.Error) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED: another connection holds a lock; retrying later succeeds."""
    msg = str(err).lower()
    return "locked" in msg or "busy" in msg


def _is_corruption(err: sqlite3.Error) -> bool:
    code = getattr(err, "sqlite_errorcode", None)  # Python >= 3.11
    if code is not None and (code & 0xFF) in _CORRUPT_CODES:
        return True
    msg = str(err).lower()
    return any(w in msg for w in _CORRUPT_WORDS)


class LMCache:
    """Memory-first, then disk. ``path=None`` uses ``default_cache_path()``; ``path=":memory:"`` keeps
    nothing on disk (tests, throwaway runs)."""

    def __init__(
        self, path: str | os.PathLike | None = None, *, memory_entries: int = 50_000, busy_timeout_s: float = 30.0
    ):
        check_int(memory_entries, "LMCache: memory_entries", min=0)
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"LMCache: path must be a str, os.PathLike or None, got {type(path).__name__}")
        self.memory_only = path == ":memory:"
        self.path = None if self.memory_only else Path(path if path is not None else default_cache_path())
        self.memory_entries = memory_entries
        self.busy_timeout_s = float(busy_timeout_s)
        self._mem: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._conn_pid: int | None = None
        self._inode: int | None = None  # of the file we opened: tells "someone already replaced it"
        self._disabled_reason: str | None = None
        self.moved_aside: list[Path] = []  # corrupt files set aside by this process

    # --- connection -----------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection | None:
        """The connection for this process, opened (and checked) on first use; None when memory-only."""
        if self.memory_only or self._disabled_reason is not None:
            return None
        if self._conn is not None and self._conn_pid == os.getpid():
            return self._conn
        self._conn = None  # inherited across fork: never reuse it
        busy_deadline = time.monotonic() + self.busy_timeout_s
        moved_aside = False  # a corrupt file is moved aside once, then the open is tried again
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(
                    str(self.path), timeout=self.busy_timeout_s, check_same_thread=False, isolation_level=None
                )  # autocommit: each statement its own txn
                try:
                    conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes
                    conn.execute(_SCHEMA)
                    check = conn.execute("PRAGMA quick_check").fetchone()
                    if not check or check[0] != "ok":
                        raise sqlite3.DatabaseError(f"database disk image is malformed (quick_check: {check})")
                except BaseException:
                    conn.close()
                    raise
                self._conn, self._conn_pid = conn, os.getpid()
                try:
                    self._inode = os.stat(self.path).st_ino
                except OSError:
                    self._inode = None
                return conn
            except sqlite3.DatabaseError as e:
                if _is_busy(e) and time.monotonic() < busy_deadline:
                    # Another process is creating the file or switching it to WAL right now (a brand-new
                    # cache opened by two processes at once): wait for it instead of giving up on the disk.
                    time.sleep(0.02 + 0.05 * random.random())
                    continue
                if not moved_aside and _is_corruption(e) and self.path.exists():
                    self._move_aside(e)
                    moved_aside = True
                    continue
                self._disable(f"cannot open the LM cache at {self.path}: {e}")
                return None
            except OSError as e:
                self._disable(f"cannot create the LM cache directory {self.path.parent}: {e}")
                return None

    def _disable(self, reason: str) -> None:
        self._disabled_reason = reason
        warnings.warn(f"{reason}; continuing with an in-memory cache only", RuntimeWarning, stacklevel=4)
        logger.warning("%s; continuing with an in-memory cache only", reason)

    def _move_aside(self, err: Exception) -> None:
        """Renames the corrupt file (unless another process already replaced it) and warns."""
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
        self._conn = None
        try:
            inode_now = os.stat(self.path).st_ino
        except OSError:
            return  # already gone: the next connect creates a fresh file
        if self._inode is not None and inode_now != self._inode:
            self._inode = None
            return  # another process moved the corrupt file aside and created a fresh one: just reconnect
        dest = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}-{os.getpid()}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                try:
                    os.replace(src, Path(str(dest) + suffix))
                except OSError:
                    pass
        self._inode = None
        self.moved_aside.append(dest)
        msg = f"LM cache {self.path} is corrupt ({err}); moved it aside to {dest} and started a fresh cache"
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
        logger.warning(msg)

    def _run(self, fn, default):
        """Runs ``fn(conn)`` on the disk layer; corruption -> set aside + one retry; other errors -> default."""
        for attempt in range(2):
            conn = self._connect()
            if conn is None:
                return default
            try:
                return fn(conn)
            except sqlite3.DatabaseError as e:
                if attempt == 0 and _is_corruption(e):
                    self._move_aside(e)
                    continue
                logger.warning("LM cache %s: %s (ignored: the request is served without the disk cache)", self.path, e)
                return default
        return default

    # --- memory layer ---------------------------------------------------------------------------
    def _mem_put(self, key: str, value: dict) -> None:
        if self.memory_entries == 0 and not self.memory_only:
            return
        self._mem[key] = value
        self._mem.move_to_end(key)
        if not self.memory_only:
            while len(self._mem) > self.memory_entries:
                self._mem.popitem(last=False)

    # --- public API -----------------------------------------------------------------------------
    def get_many(self, keys: Iterable[str]) -> dict[str, dict]:
        """The entries found, memory first then disk (disk hits are promoted to memory)."""
        keys = list(dict.fromkeys(keys))
        with self._lock:
            found = {}
            for k in keys:
                if k in self._mem:
                    self._mem.move_to_end(k)
                    found[k] = self._mem[k]
            missing = [k for k in keys if k not in found]
            if missing:

                def read(conn):
                    rows = []
                    for i in range(0, len(missing), 500):  # stay under SQLite's bound-parameter limit
                        chunk = missing[i : i + 500]
                        q = f"SELECT key, value FROM completions WHERE key IN ({','.join('?' * len(chunk))})"
                        rows += conn.execute(q, chunk).fetchall()
                    return rows

                for k, v in self._run(read, []):
                    try:
                        found[k] = json.loads(v)
                    except ValueError:
                        continue  # a torn value is a miss, not a crash
                    self._mem_put(k, found[k])
            return found

    def get(self, key: str) -> dict | None:
        return self.get_many([key]).get(key)

    def put_many(self, items: Mapping[str, dict]) -> None:
        if not items:
            return
        with self._lock:
            for k, v in items.items():
                self._mem_put(k, v)
            now = time.time()
            rows = [(k, json.dumps(v, ensure_ascii=False), now) for k, v in items.items()]

            def write(conn):
                conn.execute("BEGIN IMMEDIATE")  # take the write lock once for the whole batch
                try:
                    conn.executemany("INSERT OR REPLACE INTO completions (key, value, created) VALUES (?,?,?)", rows)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise

            self._run(write, None)

    def put(self, key: str, value: dict) -> None:
        self.put_many({key: value})

    def __len__(self) -> int:
        with self._lock:
            n = self._run(lambda c: c.execute("SELECT COUNT(*) FROM completions").fetchone()[0], None)
            return len(self._mem) if n is None else n

    def clear(self) -> None:
        with self._lock:
            self._mem.clear()
            self._run(lambda c: c.execute("DELETE FROM completions"), None)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._conn_pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __repr__(self) -> str:
        where = "memory" if self.memory_only else str(self.path)
        return f"LMCache({where!r}, memory_entries={self.memory_entries})"


_SHARED: dict[str, LMCache] = {}
_SHARED_LOCK = threading.Lock()


def resolve_cache(cache: bool | str | os.PathLike | LMCache | None) -> LMCache | None:
    """Backend constructors' ``cache=`` argument: True -> the shared default cache file; False/None -> no
    cache; a path -> the shared cache at that path (one connection per file per process); an LMCache."""
    if cache is None or cache is False:
        return None
    if isinstance(cache, LMCache):
        return cache
    if cache is True:
        path = str(default_cache_path())
    elif isinstance(cache, (str, os.PathLike)):
        path = str(cache)
    else:
        raise TypeError(f"cache must be True/False/None, a path or an LMCache, got {type(cache).__name__}")
    key = path if path == ":memory:" else os.path.abspath(path)
    with _SHARED_LOCK:
        if key == ":memory:":
            return LMCache(":memory:")  # a memory cache is private to its LM
        if key not in _SHARED:
            _SHARED[key] = LMCache(key)
        return _SHARED[key]
