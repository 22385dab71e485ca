"""The feature cache: keyed exactly, outside the data, streamed to disk, shared by ranks, and
strict about duplicate sample keys."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vla.cache
from vla.cache import FeatureTable, cache_root, cached_features
from vla.errors import UserError

VLA = [sys.executable, "-m", "vla"]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLA_CACHE_DIR", str(tmp_path / "cache"))


def rows_of(keys, texts, origin="s.tar"):
    return lambda: iter([(k, t, origin) for k, t in zip(keys, texts)])


def test_features_are_computed_once_and_keyed_by_model_data_and_texts(tmp_path):
    calls = []

    def encode(texts):
        calls.append(len(texts))
        return torch.tensor([[float(len(t)), 1.0] for t in texts])

    keys, texts = ["a", "b", "c"], ["x", "yy", "zzz"]
    kw = dict(model_identity="m1", data_digest="d1", encode=encode, batch_size=2)
    table, hit = cached_features("phi.short", rows_of(keys, texts), **kw)
    assert not hit and calls == [2, 1]
    assert table.lookup(["c", "a"]).tolist() == [[3.0, 1.0], [1.0, 1.0]]
    assert table[[0, 2]].tolist() == [[1.0, 1.0], [3.0, 1.0]] and table.shape == (3, 2)
    table, hit = cached_features("phi.short", rows_of(keys, texts), **kw)
    assert hit and calls == [2, 1]  # reused, not recomputed
    assert table.lookup(["b"]).tolist() == [[2.0, 1.0]]
    for change in ({"model_identity": "m2"}, {"data_digest": "d2"}):
        assert not cached_features("phi.short", rows_of(keys, texts), **{**kw, **change})[1]
    assert not cached_features("phi.short", rows_of(keys, ["x", "yy", "other"]), **kw)[1]
    assert not cached_features("phi.short", rows_of(["a", "c", "b"], texts), **kw)[1]  # texts moved keys
    assert not cached_features("phi.long", rows_of(keys, texts), **kw)[1]
    entries = sorted(p.parent for p in (tmp_path / "cache" / "features").glob("*/meta.json"))
    assert len(entries) == 6 and all(json.loads((e / "meta.json").read_text())["format"] == 2 for e in entries)
    with pytest.raises(KeyError, match="'zz' is not in feature table"):
        table.lookup(["a", "zz"])


def test_the_cache_lives_where_the_user_says_never_beside_the_data(tmp_path, monkeypatch):
    monkeypatch.delenv("VLA_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "vla" / "features"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "vla" / "features"
    monkeypatch.setenv("VLA_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine" / "features"


def test_an_unwritable_cache_warns_once_and_still_gives_the_features(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")  # root ignores modes, so a file parent stands for read-only
    monkeypatch.setenv("VLA_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(vla.cache, "_PRIVATE", None)
    encode = lambda b: torch.tensor([[float(len(t))] for t in b])  # noqa: E731
    with caplog.at_level("WARNING", logger="vla.cache"):
        for name in ("phi.a", "phi.b"):
            table, hit = cached_features(name, rows_of(["k1", "k2"], ["ab", "abc"]), model_identity="m",
                                         data_digest="d", encode=encode)
            assert not hit and table.lookup(["k2", "k1"]).flatten().tolist() == [3.0, 2.0]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(blocker / "cache") in warnings[0] and "VLA_CACHE_DIR" in warnings[0]


def test_interrupted_computation_leaves_no_entry(tmp_path):
    def failing(texts):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_features("phi.long", rows_of(["a"], ["x"]), model_identity="m", data_digest="d", encode=failing)
    assert not list((tmp_path / "cache").rglob("*.npy")) and not list((tmp_path / "cache").rglob(".build-*"))


def test_texts_are_encoded_in_length_sorted_windows_and_rows_keep_their_order(monkeypatch):
    monkeypatch.setattr(vla.cache, "WINDOW_ROWS", 4)  # windows of 4 texts: [5 1 4 2] [3 6]
    batches = []

    def encode(texts):
        batches.append(list(texts))
        return torch.tensor([[float(len(t))] for t in texts])

    texts = ["a" * n for n in (5, 1, 4, 2, 3, 6)]
    keys = [f"k{i}" for i in range(len(texts))]
    table, _ = cached_features("phi.long", rows_of(keys, texts), model_identity="m", data_digest="d",
                               encode=encode, batch_size=2)
    # each batch holds texts of neighbouring lengths within its window (less padding) ...
    assert [[len(t) for t in b] for b in batches] == [[1, 2], [4, 5], [3, 6]]
    # ... and every row is still the feature of its own key
    assert table.lookup(keys).flatten().tolist() == [5.0, 1.0, 4.0, 2.0, 3.0, 6.0]
    assert table[:].flatten().tolist() == [5.0, 1.0, 4.0, 2.0, 3.0, 6.0]


def test_duplicate_keys_are_refused_naming_both_origins_whatever_the_run_layout(monkeypatch):
    monkeypatch.setattr(vla.cache, "RUN_ROWS", 7)  # the two copies land in different sorted runs
    keys = [f"{i:04d}" for i in range(40)]
    rows = [(k, f"caption {k}", f"{i // 10:05d}.tar") for i, k in enumerate(keys)]
    rows.append(("0003", "another caption", "00009.tar"))
    with pytest.raises(UserError) as err:
        cached_features("phi.caption", lambda: iter(rows), model_identity="m", data_digest="d",
                        encode=lambda b: torch.zeros(len(b), 2))
    assert str(err.value).startswith("sample key '0003' occurs twice, in 00000.tar and in 00009.tar")
    assert not list(cache_root().rglob("*.npy"))  # nothing was encoded or kept


@pytest.mark.parametrize("run_rows,block_rows", [(1000, 2048), (7, 3), (64, 5), (1, 1)])
def test_key_index_merge_is_a_full_sort_and_finds_duplicates_at_any_block_boundary(tmp_path, monkeypatch,
                                                                                   run_rows, block_rows):
    """The external sort of key digests: for any layout of sorted runs and merge blocks, the index
    is the rows sorted by digest; a key given twice is found (the first equal pair in digest
    order), whether its copies share a run or a block or not."""
    monkeypatch.setattr(vla.cache, "BLOCK_ROWS", block_rows)
    keys = [f"{i:05d}" for i in range(300)]

    def merged(keys):
        digests, runs = bytearray(), []
        for i, key in enumerate(keys, 1):
            digests += vla.cache.key_digests([key]).astype("<u8").tobytes()
            if i % run_rows == 0:
                runs.append(vla.cache._write_run(tmp_path / f"run{len(runs)}", digests, i))
                digests = bytearray()
        if digests:
            runs.append(vla.cache._write_run(tmp_path / f"run{len(runs)}", digests, len(keys)))
        return vla.cache._merge_runs(runs, tmp_path / "index.npy", len(keys))

    assert merged(keys) is None
    index = np.load(tmp_path / "index.npy")
    d = vla.cache.key_digests(keys)
    want = np.column_stack([d, np.arange(len(keys), dtype=np.uint64)])
    assert np.array_equal(index, want[np.lexsort((want[:, 1], want[:, 0]))])
    for first, second in ((3, 4), (0, 299), (150, 151), (10, 200)):
        twice = list(keys)
        twice[second] = keys[first]
        assert merged(twice) == (first, second)


def _tiny_shard(path: Path, keys: list[str], start: int) -> None:
    from vla.data.sample import Sample
    from vla.data.shards import ShardWriter

    with ShardWriter(path.parent, maxcount=100, image_format="png", start_index=start) as w:
        for i, key in enumerate(keys):
            w.write(Sample(key=key, image=Image.new("RGB", (8, 8), (i * 20, 0, 0)),
                           captions=[f"a red square number {i}"], long_caption=f"a long caption {key} " * 3))


def test_duplicate_keys_across_shards_stop_distill_before_training(tmp_path):
    data = tmp_path / "merged"
    _tiny_shard(data / "x", [f"{i:06d}" for i in range(6)], start=0)        # 00000.tar
    _tiny_shard(data / "x", [f"{i:06d}" for i in range(4, 10)], start=1)    # 00001.tar: 000004, 000005 again
    out = tmp_path / "run"
    r = subprocess.run([*VLA, "distill", "--data", str(data), "--out", str(out), "--teacher", "vla-tiny-clip",
                        "--embedder", "vla-tiny-qwen", "--set", "train.steps=1", "--set", "train.batch_size=4"],
                       capture_output=True, text=True, env=os.environ, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    # 000004 and 000005 are both in both shards: the message names one of them and both shards
    assert any(f"sample key '{k}' occurs twice, in {data / '00000.tar'} and in {data / '00001.tar'}" in lines[0]
               for k in ("000004", "000005")), lines[0]
    assert not out.exists() and not list(out.parent.glob("run.*"))  # no artifact, no partial


WORKER = '''
import json
import sys
import numpy as np
import torch
from vla.cache import cached_features
from vla.distributed import init_distributed
from vla.errors import UserError

def encode(texts):  # exact and batch-independent: a feature depends on its own text only
    return torch.tensor([[float(len(t)), float(sum(map(ord, t)) % 1009), float(t.count("e"))] for t in texts])

def rows():
    yield from ((f"{i:05d}", "e" * (i % 13) + f" caption {i}", f"{i // 50:05d}.tar") for i in range(203))
    if "dup" in sys.argv:
        yield "00007", "merged twice", "00099.tar"

dist = init_distributed("cpu")
result = f"{sys.argv[1]}/rank{dist.rank}.json"  # what this rank saw: never the shared stdout
try:
    table, hit = cached_features("phi.caption", rows, model_identity="m", data_digest="d", encode=encode,
                                 batch_size=8)
except UserError as e:
    json.dump({"error": str(e)}, open(result, "w"))
    sys.exit(2)
np.save(f"{sys.argv[1]}/rank{dist.rank}.npy", table[:].numpy())
json.dump({"hit": hit}, open(result, "w"))
'''


def _seen(where: Path, ranks: int) -> list[dict]:
    return [json.loads((where / f"rank{r}.json").read_text()) for r in range(ranks)]


def test_two_ranks_build_the_same_table_as_one_process(tmp_path):
    """Under torchrun both ranks build (miss) one shared cache entry, equal to one process' table;
    a later single process hits it; a duplicate key stops every rank with the same error. Each
    rank reports in its own file."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLA_CACHE_DIR": str(tmp_path / "shared")}
    for d in ("two", "one", "again", "dup"):
        (tmp_path / d).mkdir()
    r = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(worker), str(tmp_path / "two")],
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _seen(tmp_path / "two", 2) == [{"hit": False}, {"hit": False}]
    two = [np.load(tmp_path / "two" / f"rank{i}.npy") for i in (0, 1)]
    single = subprocess.run([sys.executable, str(worker), str(tmp_path / "one")], capture_output=True, text=True,
                            env={**env, "VLA_CACHE_DIR": str(tmp_path / "alone")}, timeout=120)
    assert single.returncode == 0 and _seen(tmp_path / "one", 1) == [{"hit": False}], single.stderr[-3000:]
    one = np.load(tmp_path / "one" / "rank0.npy")
    assert one.shape == (203, 3) and np.array_equal(one, two[0]) and np.array_equal(one, two[1])
    assert len(np.unique(one[:, 1])) > 100  # rows differ, so equality is not the trivial kind
    # the entry the two ranks wrote is the one a single process finds (a hit), and no part is left
    again = subprocess.run([sys.executable, str(worker), str(tmp_path / "again")], capture_output=True, text=True,
                           env=env, timeout=120)
    assert _seen(tmp_path / "again", 1) == [{"hit": True}], again.stderr[-3000:]
    shared = tmp_path / "shared" / "features"
    assert [p.name for p in shared.iterdir()] == [next(shared.iterdir()).name]  # one entry, no .build-*
    entry = FeatureTable(next(shared.iterdir()))
    assert entry.lookup(["00202", "00000"]).tolist() == [one[202].tolist(), one[0].tolist()]
    # rank 0 finds a duplicate key: every rank stops with the same one-line error, none waits forever
    r = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(worker), str(tmp_path / "dup"),
                        "dup"], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode != 0
    for seen in _seen(tmp_path / "dup", 2):
        assert "sample key '00007' occurs twice, in 00000.tar and in 00099.tar" in seen["error"], seen


def test_peak_memory_does_not_grow_with_the_number_of_texts(tmp_path):
    """`python -m vla.bench --only d --quick`: peak RSS of building the cache for N and 4N texts,
    each in a fresh process, with 1024-wide rows (holding 4N's rows in memory would add ~100 MB)."""
    env = {**os.environ, "VLA_BENCH_DIR": str(tmp_path)}
    subprocess.run([*VLA[:1], "-m", "vla.bench", "--only", "d", "--quick"], env=env, check=True,
                   capture_output=True, timeout=300)
    details = json.loads((tmp_path / "results.json").read_text())["parts"]["d"]["details"]
    small, large = details["small"], details["large"]
    assert (small["rows"], large["rows"], large["dim"]) == (12_000, 48_000, 1024) and large["rows_per_s"] > 0
    assert large["peak_rss_mb"] - small["peak_rss_mb"] < 12, (small, large)
    assert not (tmp_path / "cache-scale").exists() or not any((tmp_path / "cache-scale").rglob("*.npy"))
