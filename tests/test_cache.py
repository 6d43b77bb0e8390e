"""The table cache: content-addressed, atomic, corrupt entries rebuilt, concurrent builds safe."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import torch

from tabconv.cache import TableCache, cache_key
from tabconv.quantizer import ProductQuantizer

PARTS = {"checkpoint_sha256": "abc", "layer": "conv1", "setting": {"codebooks": 2, "centroids": 4}}


def fitted(seed: int = 0) -> ProductQuantizer:
    g = torch.Generator().manual_seed(seed)
    return ProductQuantizer(2, 4, random_state=seed).fit(torch.randn(200, 6, generator=g)).set_weight(
        torch.randn(6, 3, generator=g))


def test_second_request_is_read_from_disk(tmp_path):
    first = TableCache(tmp_path)
    built = first.get_or_build(PARTS, fitted)
    assert first.builds == 1
    second = TableCache(tmp_path)
    loaded = second.get_or_build(PARTS, lambda: (_ for _ in ()).throw(AssertionError("rebuilt")))
    assert second.hits == 1 and second.builds == 0
    x = torch.randn(5, 6)
    torch.testing.assert_close(loaded(x), built(x))


def test_key_covers_every_part():
    assert cache_key(PARTS) == cache_key(dict(reversed(PARTS.items())))
    assert cache_key(PARTS) != cache_key({**PARTS, "layer": "conv2"})
    assert cache_key(PARTS) != cache_key({**PARTS, "setting": {"codebooks": 2, "centroids": 8}})


def test_corrupt_or_truncated_entries_are_rebuilt(tmp_path):
    cache = TableCache(tmp_path)
    cache.get_or_build(PARTS, fitted)
    path = cache.path(cache_key(PARTS))
    for damage in (b"not a torch file", path.read_bytes()[:100], b""):
        path.write_bytes(damage)
        cache.builds = 0
        result = cache.get_or_build(PARTS, fitted)
        assert cache.builds == 1 and result.tables_.shape == (2, 4, 3)
    entry = torch.load(path, weights_only=True)
    entry["key"] = "0" * 64  # a valid file under the wrong name is not trusted either
    torch.save(entry, path)
    cache.builds = 0
    cache.get_or_build(PARTS, fitted)
    assert cache.builds == 1


def _build_in_process(root: str, out: mp.Queue) -> None:
    cache = TableCache(root)
    cache.get_or_build(PARTS, fitted)
    out.put(cache.builds)


def test_concurrent_builds_leave_one_valid_entry(tmp_path):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(str(tmp_path), out)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    builds = sorted(out.get(timeout=5) for _ in procs)
    assert builds == [0, 0, 1]  # the lock makes the others read the first one's entry
    entries = TableCache(tmp_path).entries()
    assert len(entries) == 1 and not entries[0].description.get("damaged")
    assert not [p for p in Path(tmp_path).rglob("*.tmp")]


def test_ls_and_clear(tmp_path):
    cache = TableCache(tmp_path)
    cache.get_or_build(PARTS, fitted)
    cache.get_or_build({**PARTS, "layer": "fc"}, fitted)
    entries = cache.entries()
    assert sorted(e.layer for e in entries) == ["conv1", "fc"] and all(e.size_bytes > 0 for e in entries)
    assert cache.clear() == 2 and cache.entries() == []
