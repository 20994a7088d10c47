"""The persistent completion cache: keys, memory/disk layers, threads, processes, corruption."""

import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest

from optimas_fast.lm import LMCache, cache_key, resolve_cache
from optimas_fast.lm.cache import default_cache_path


def value(i, rng):
    return {"text": f"text {i} {rng.random()}", "finish_reason": "stop", "prompt_tokens": i, "completion_tokens": 1}


def test_keys_are_stable_and_separate_what_matters(seed):
    rng = random.Random(seed)
    ident = {"backend": "openai", "model": f"m{rng.randrange(100)}"}
    prompt = [{"role": "user", "content": f"q{rng.random()}"}]
    params = {"temperature": 0.7, "max_tokens": 5, "stop": [], "seed": seed}
    k = cache_key(ident, prompt, params, 0)
    assert k == cache_key(dict(reversed(list(ident.items()))), prompt, dict(reversed(list(params.items()))), 0)
    assert len(k) == 64
    others = [
        cache_key({**ident, "model": ident["model"] + "x"}, prompt, params, 0),
        cache_key({**ident, "backend": "hf"}, prompt, params, 0),
        cache_key(ident, [{"role": "system", "content": prompt[0]["content"]}], params, 0),
        cache_key(ident, prompt, {**params, "temperature": 0.8}, 0),
        cache_key(ident, prompt, {**params, "seed": seed + 1}, 0),
        cache_key(ident, prompt, params, 1),  # the next sample is a different entry
    ]
    assert len({k, *others}) == len(others) + 1


def test_memory_then_disk(tmp_path, seed):
    rng = random.Random(seed)
    path = tmp_path / "c.sqlite"
    c = LMCache(path, memory_entries=3)
    items = {f"k{i}": value(i, rng) for i in range(7)}
    c.put_many(items)
    assert len(c._mem) == 3  # bounded LRU in front of the file
    assert c.get_many(list(items)) == items
    assert len(c) == 7
    c2 = LMCache(path)  # a fresh object: everything comes from disk
    assert c2.get("k5") == items["k5"] and c2.get("missing") is None
    mem = LMCache(":memory:")
    mem.put("a", items["k0"])
    assert mem.get("a") == items["k0"] and mem.path is None


def test_threads_share_one_cache(tmp_path, seed):
    rng = random.Random(seed)
    c = LMCache(tmp_path / "c.sqlite", memory_entries=10)  # small memory: most reads hit the disk
    vals = {f"t{t}-{i}": value(i, rng) for t in range(6) for i in range(40)}
    errors = []

    def work(t):
        try:
            for i in range(40):
                k = f"t{t}-{i}"
                c.put(k, vals[k])
                other = f"t{(t + 1) % 6}-{i}"
                got = c.get(other)
                assert got is None or got == vals[other]
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert LMCache(tmp_path / "c.sqlite").get_many(list(vals)) == vals


WRITER = textwrap.dedent("""
    import sys
    from optimas_fast.lm import LMCache
    path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    c = LMCache(path, memory_entries=0)
    for i in range(n):
        c.put(f"{tag}-{i}", {"text": f"{tag} {i}"})
        c.put(f"shared-{i}", {"text": f"shared {i}"})   # both processes write the same keys too
        assert c.get(f"{tag}-{i}") == {"text": f"{tag} {i}"}
    print("ok")
""")


def test_two_processes_write_concurrently(tmp_path, seed):
    path = tmp_path / "c.sqlite"
    n = 150 + seed % 50
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), tag, str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("a", "b")
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    c = LMCache(path)
    keys = [f"{t}-{i}" for t in "ab" for i in range(n)] + [f"shared-{i}" for i in range(n)]
    got = c.get_many(keys)
    assert len(got) == 3 * n and got["a-0"] == {"text": "a 0"} and got[f"shared-{n - 1}"] == {"text": f"shared {n - 1}"}
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("damage", ["garbage", "truncated_page"])
def test_corrupt_file_is_moved_aside(tmp_path, seed, damage):
    rng = random.Random(seed)
    path = tmp_path / "c.sqlite"
    if damage == "garbage":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(4096 + seed % 1000)))
    else:  # a real database whose pages were overwritten in the middle
        c = LMCache(path)
        c.put_many({f"k{i}": value(i, rng) for i in range(300)})
        c.close()
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        data = bytearray(path.read_bytes())
        for off in range(4096, len(data), 4096):  # keep the header page, smash every other page
            data[off : off + 4096] = bytes(rng.randrange(256) for _ in range(min(4096, len(data) - off)))
        path.write_bytes(bytes(data))
    c = LMCache(path)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert c.get("k1") is None
    assert len(c.moved_aside) == 1 and c.moved_aside[0].exists()
    c.put("fresh", {"text": "ok"})  # a fresh file works
    assert LMCache(path).get("fresh") == {"text": "ok"}


def test_corruption_found_later_is_handled(tmp_path, seed):
    path = tmp_path / "c.sqlite"
    c = LMCache(path, memory_entries=0)
    c.put("a", {"text": "1"})
    c.close()
    # another process clobbers the file while this one still thinks it is fine
    path.write_bytes(b"not a database at all" * (50 + seed % 20))
    for suffix in ("-wal", "-shm"):
        if os.path.exists(str(path) + suffix):
            os.remove(str(path) + suffix)
    with pytest.warns(RuntimeWarning, match="moved it aside"):
        c.put("b", {"text": "2"})
    assert c.get("b") == {"text": "2"}


def test_unwritable_location_degrades_to_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file, not a directory")
    c = LMCache(blocker / "sub" / "c.sqlite")
    with pytest.warns(RuntimeWarning, match="in-memory cache only"):
        c.put("a", {"text": "1"})
    assert c.get("a") == {"text": "1"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not on every call
        c.put("b", {"text": "2"})


def test_default_path_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMAS_FAST_CACHE_DIR", str(tmp_path))
    assert default_cache_path() == tmp_path / "lm_cache.sqlite"
    c = resolve_cache(True)
    assert c.path == tmp_path / "lm_cache.sqlite" and resolve_cache(True) is c  # shared per file
    assert resolve_cache(False) is None and resolve_cache(None) is None
    assert resolve_cache(":memory:") is not resolve_cache(":memory:")


def test_bad_arguments():
    with pytest.raises(ValueError, match="memory_entries"):
        LMCache(":memory:", memory_entries=-1)
    with pytest.raises(TypeError, match="path"):
        LMCache(123)
    with pytest.raises(TypeError, match="cache must be"):
        resolve_cache(1.5)
