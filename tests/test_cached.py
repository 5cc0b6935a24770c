"""emb=cached: exactness against emb=full (host and disk, LFU and LRU, tiny caches), hit rates on
Zipf ids, the disk files, the TT store's mixing of cached and TT rows, bytes, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.embeddings import TableSpec, build_embeddings
from dlrm.embeddings.cached.disk import read_disk_table
from dlrm.embeddings.cached import CachedEmbeddings
from dlrm.embeddings.full import FullEmbeddings
from dlrm.embeddings.tt import TTEmbeddings
from dlrm.embeddings.tt_kernels import tt_rows

CPU = torch.device("cpu")
ADAGRAD = OmegaConf.create({"name": "rowwise_adagrad", "lr": 0.1, "eps": 1e-8})
TABLES = [
    TableSpec("t_A", rows=20_000, dim=8, features=("A",)),
    TableSpec("t_B", rows=12_000, dim=8, features=("B", "B2")),  # shared by two features
    TableSpec("t_C", rows=30_000, dim=8, features=("C",)),
]


def emb_cfg(**kw):
    base = {"name": "cached", "dim": 8, "pooling": "sum", "check_ids": True, "store": "host",
            "cache_rows": None, "cache_fraction": 0.01, "policy": "lfu", "warm_start": "none"}  # fmt: skip
    return OmegaConf.create({**base, **kw})


def zipf_probs(rows: int, alpha: float = 1.05) -> np.ndarray:
    p = 1.0 / np.arange(1, rows + 1) ** alpha
    return p / p.sum()


def batches(n: int, batch: int, seed: int = 0, multi_hot: int = 3):
    """n (KJT, labels) batches: Zipf ids, feature B2 multi-hot with 1..multi_hot ids per bag."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        values, lengths = [], []
        for t in TABLES:
            p = zipf_probs(t.rows)
            for f in t.features:
                ls = rng.integers(1, multi_hot + 1, batch) if f == "B2" else np.ones(batch, np.int64)
                values.append(rng.choice(t.rows, int(ls.sum()), p=p))
                lengths.append(ls)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[f for t in TABLES for f in t.features],
            values=torch.from_numpy(np.concatenate(values)).long(),
            lengths=torch.from_numpy(np.concatenate(lengths)).long(),
        )
        out.append((kjt, torch.from_numpy(rng.integers(0, 2, batch)).float()))
    return out


def train(emb, data) -> list[float]:
    """Embeddings -> tiny MLP -> BCE, dense SGD; the tables update fused in backward."""
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(8 * 4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(head.parameters(), lr=0.05)
    losses = []
    for kjt, y in data:
        logits = head(emb(kjt).values()).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


DATA = batches(50, 32)


@pytest.mark.parametrize(
    "store,policy,sample", [("host", "lfu", 16), ("host", "lru", 0), ("disk", "lfu", 0), ("disk", "lru", 16)]
)
def test_training_equals_full_with_a_one_percent_cache(store, policy, sample, tmp_path):
    torch.manual_seed(1)
    full = FullEmbeddings(TABLES, emb_cfg(name="full"), ADAGRAD, CPU)
    cached = CachedEmbeddings(
        TABLES, emb_cfg(store=store, policy=policy, evict_sample=sample, path=str(tmp_path / "store")),
        ADAGRAD, CPU,
    )
    assert {n: c.capacity for n, c in cached.caches.items()} == {"t_A": 200, "t_B": 120, "t_C": 300}
    for t, w in zip(TABLES, full.tbe.split_embedding_weights()):
        cached.load_weights(t.name, w)
    expected = train(full, DATA)
    got = train(cached, DATA)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    stats = cached.stats()
    # The cache really turned over: rows were evicted and written back, and came back later.
    assert stats["cache_evictions_per_step"] > 5 and stats["cache_grows"] == 0
    assert 0.3 < stats["cache_hit_rate"] < 0.95
    assert stats["cache_bytes_moved_per_step"] > 0
    full_states = full.tbe.split_optimizer_states()
    for i, (t, w) in enumerate(zip(TABLES, full.tbe.split_embedding_weights())):
        cw, cs = cached.cold_rows(t.name)  # flushes
        torch.testing.assert_close(cw, w.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(cs[:, 0], full_states[i][0].detach(), rtol=0, atol=1e-6)
        assert not torch.equal(w.detach()[:5], cached.store.weights[t.name][:5] * 0)  # trained rows


def test_disk_store_uses_its_files(tmp_path):
    torch.manual_seed(1)
    full = FullEmbeddings(TABLES, emb_cfg(name="full"), ADAGRAD, CPU)
    cached = CachedEmbeddings(TABLES, emb_cfg(store="disk", path=str(tmp_path)), ADAGRAD, CPU)
    for t, w in zip(TABLES, full.tbe.split_embedding_weights()):
        cached.load_weights(t.name, w)
    assert json.loads((tmp_path / "store.json").read_text())["clean"] is False
    train(full, DATA[:20])
    train(cached, DATA[:20])
    cached.flush()
    assert json.loads((tmp_path / "store.json").read_text())["clean"] is True
    for t, w in zip(TABLES, full.tbe.split_embedding_weights()):
        assert (tmp_path / f"{t.name}.rows.f32").stat().st_size == t.rows * (t.dim + 1) * 4
        on_disk, state = read_disk_table(tmp_path, t.name)  # a fresh read of the files
        np.testing.assert_allclose(on_disk, w.detach().numpy(), rtol=0, atol=1e-6)
        assert (np.asarray(state) > 0).any()
    # Resident bytes leave the files out: cache + its state + maps + the journal's 1 bit per row.
    cache_rows = sum(c.capacity for c in cached.caches.values())
    maps = sum(t.rows * 4 + (t.rows + 7) // 8 for t in TABLES) + cache_rows * 16
    assert cached.embedding_bytes() == cache_rows * (8 + 1) * 4 + maps


def test_host_bytes_include_the_host_table():
    cached = CachedEmbeddings(TABLES, emb_cfg(), ADAGRAD, CPU)
    cache_rows = sum(c.capacity for c in cached.caches.values())
    maps = sum(t.rows * 4 for t in TABLES) + cache_rows * 16
    host = sum(t.rows * (8 + 1) * 4 for t in TABLES)
    assert cached.embedding_bytes() == cache_rows * 9 * 4 + maps + host
    assert cached.full_bytes() == host


def test_batches_larger_than_the_cache_grow_it_and_stay_exact(tmp_path):
    torch.manual_seed(1)
    full = FullEmbeddings(TABLES, emb_cfg(name="full"), ADAGRAD, CPU)
    cached = CachedEmbeddings(TABLES, emb_cfg(cache_rows=5, policy="lru", shrink_after=2), ADAGRAD, CPU)
    for t, w in zip(TABLES, full.tbe.split_embedding_weights()):
        cached.load_weights(t.name, w)
    tiny = batches(6, 1, seed=5, multi_hot=1)  # 1-2 ids per table: fit in 5 rows, so it shrinks back
    data = DATA[:8] + tiny[:3] + DATA[8:12] + tiny[3:]
    np.testing.assert_allclose(train(cached, data), train(full, data), rtol=0, atol=1e-6)
    assert cached.stats()["cache_grows"] >= 2
    assert {c.capacity for c in cached.caches.values()} == {5}  # shrank back after the tiny batches
    for t, w in zip(TABLES, full.tbe.split_embedding_weights()):
        torch.testing.assert_close(cached.cold_rows(t.name)[0], w.detach(), rtol=0, atol=1e-6)


def hit_rate(policy, warm, counts_dir=None, perm=None, steps: int = 150, batch: int = 64) -> float:
    """Hit rate over `steps` batches of `batch` Zipf ids (the id of rank r is perm[r])."""
    rows, cache = 10_000, 100
    table = [TableSpec("t_Z", rows=rows, dim=4, features=("Z",))]
    cfg = emb_cfg(dim=4, cache_rows=cache, policy=policy, warm_start=warm, counts=counts_dir)
    emb = CachedEmbeddings(table, cfg, ADAGRAD, CPU)
    rng = np.random.default_rng(3)
    p = zipf_probs(rows)
    with torch.no_grad():
        for _ in range(steps):
            ranks = rng.choice(rows, batch, p=p)
            ids = torch.from_numpy(ranks if perm is None else perm[ranks]).long()
            emb(KeyedJaggedTensor.from_lengths_sync(keys=["Z"], values=ids, lengths=torch.ones_like(ids)))
    return emb.stats()["cache_hit_rate"]


def test_hit_rates_on_zipf_ids(tmp_path):
    p = zipf_probs(10_000)
    top_mass = p[:100].sum()  # what a cache holding the 100 most frequent ids serves: ~0.59
    # True frequencies, shuffled ids: LFU warm-started from the counts file holds the top ids.
    perm = np.random.default_rng(0).permutation(10_000)
    counts = np.zeros(10_000, np.int64)
    counts[perm] = np.round(p * 1e7).astype(np.int64)
    np.save(tmp_path / "Z.npy", counts)
    # Small batches (~4 misses each): the cache holds ~the top 96 ids, hit rate ~ top_mass.
    lfu = hit_rate("lfu", "counts", str(tmp_path), perm, steps=600, batch=8)
    assert abs(lfu - top_mass) < 0.025, (lfu, top_mass)
    # Batches of 64 bring ~27 distinct misses, and every id of a batch must sit in the cache
    # during its step: those slots churn, so LFU keeps ~the top 73 ids (mass 0.56).
    lfu64 = hit_rate("lfu", "counts", str(tmp_path), perm)
    assert p[:70].sum() - 0.02 < lfu64 < top_mass, (lfu64, p[:70].sum())
    ids = hit_rate("lfu", "ids")  # unshuffled ids are frequency-ordered: same as the counts
    assert abs(ids - lfu64) < 0.02, (ids, lfu64)
    # Without a warm start, online counting does a little worse; LRU worse still.
    online = hit_rate("lfu", "none", perm=perm)
    lru = hit_rate("lru", "none", perm=perm)
    assert 0.2 < lru < online - 0.03 < lfu64, (lru, online, lfu64)


def test_tt_store_matches_tt_then_trains_cached_rows_only():
    table = [TableSpec("t_T", rows=5_000, dim=8, features=("T", "T2"))]
    cfg = emb_cfg(store="tt", cache_rows=50, warm_start="ids",
                  tt={"rank": 4, "cores": 3, "optimizer": "sgd", "lr": 0.1})  # fmt: skip
    torch.manual_seed(0)
    cached = CachedEmbeddings(table, cfg, ADAGRAD, CPU)
    tt = TTEmbeddings(table, OmegaConf.merge(cfg, cfg.tt), ADAGRAD, CPU)
    with torch.no_grad():
        for a, b in zip(tt.cores["t_T"], cached.tt.cores["t_T"]):
            a.copy_(b)
    # Filled from the cores at construction (warm start): rows 0..49 equal the TT rows.
    w = cached.tbe.split_embedding_weights()[0]
    torch.testing.assert_close(w, tt_rows(list(tt.cores["t_T"]), tt.shapes["t_T"], torch.arange(50)))
    ids = torch.tensor([0, 3, 49, 50, 4999, 7, 7, 2000, 1])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["T", "T2"], values=ids, lengths=torch.tensor([1, 2, 1, 1, 3, 1])
    )
    torch.testing.assert_close(cached(kjt).values(), tt(kjt).values())
    # Cached ids only: the cores get no gradient, the cached rows move, nothing is written back.
    before = [c.detach().clone() for c in cached.tt.cores["t_T"]]
    hot = KeyedJaggedTensor.from_lengths_sync(
        keys=["T", "T2"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 1, 1, 1])
    )
    cached(hot).values().sum().backward()
    assert all(c.grad is None or not c.grad.any() for c in cached.tt.cores["t_T"])
    assert not torch.equal(w[1:5].detach(), tt_rows(before, tt.shapes["t_T"], torch.arange(1, 5)))
    assert all(torch.equal(a, b) for a, b in zip(before, cached.tt.cores["t_T"]))
    assert cached.stats()["cache_hit_rate"] == pytest.approx(1 - 3 / 13)  # 50, 4999, 2000 missed
    assert cached.embedding_bytes() > tt.embedding_bytes()


def test_registry_policy_and_hydra_config(compose_cfg):
    cfg = compose_cfg("emb=cached", "emb.min_rows=15000")
    assert cfg.emb.store == "host" and cfg.emb.tt.rank == 32
    emb = build_embeddings(TABLES, cfg.emb, ADAGRAD, CPU)
    assert [p.name for p in emb.parts] == ["cached", "full"]
    assert [t.name for t in emb.parts[0].tables] == ["t_A", "t_C"]
    assert emb(DATA[0][0]).values().shape == (32, 32)


def test_bad_input(tmp_path):
    with pytest.warns(UserWarning, match=r"emb.cache_rows=50000 exceeds table t_A's 20000 rows"):
        big = CachedEmbeddings(TABLES[:1], emb_cfg(cache_rows=50_000), ADAGRAD, CPU)
    assert big.caches["t_A"].capacity == 20_000
    with pytest.raises(ValueError, match=r"table t_0 has 0 rows"):
        CachedEmbeddings([TableSpec("t_0", 0, 8, ("Z",))], emb_cfg(), ADAGRAD, CPU)
    with pytest.raises(ValueError, match=r"emb.cache_rows=0"):
        CachedEmbeddings(TABLES, emb_cfg(cache_rows=0), ADAGRAD, CPU)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"emb.path=.*a_file/store.* is not a writable directory"):
        CachedEmbeddings(TABLES, emb_cfg(store="disk", path=str(blocker / "store")), ADAGRAD, CPU)
    for key, value in [("store", "ssd"), ("policy", "fifo"), ("warm_start", "yes")]:
        with pytest.raises(ValueError, match=rf"emb.{key}='{value}'"):
            CachedEmbeddings(TABLES, emb_cfg(**{key: value}), ADAGRAD, CPU)
    with pytest.raises(ValueError, match=r"emb.counts=.*missing count files"):
        CachedEmbeddings(TABLES, emb_cfg(warm_start="counts", counts=str(tmp_path)), ADAGRAD, CPU)
    emb = CachedEmbeddings(TABLES, emb_cfg(), ADAGRAD, CPU)
    bad = KeyedJaggedTensor.from_lengths_sync(
        keys=["A", "B", "B2", "C"], values=torch.tensor([1, 2, 3, 30_000]), lengths=torch.ones(4, dtype=torch.long)
    )
    with pytest.raises(ValueError, match=r"feature C: ids must be in \[0, 30000\)"):
        emb(bad)


def test_trainer_runs_cached_on_disk_and_reports_stats(compose_cfg, tiny_dataset, tmp_path):
    from dlrm.train import run

    store = tmp_path / "store"
    cfg = compose_cfg("emb=cached", "emb.store=disk", f"emb.path={store}", "emb.min_rows=1000",
                      "trainer.max_steps=12")  # fmt: skip
    results = run(cfg, tmp_path / "out")
    assert results["backend"] == "cached" and results["steps"] == 12
    assert 0 < results["cache_hit_rate"] < 1 and results["cache_evictions_per_step"] > 0
    assert (store / "store.json").exists() and list(store.glob("t_*.rows.f32"))


def test_disk_store_starts_sparse_with_a_deterministic_init(tmp_path):
    from dlrm.embeddings.cached.disk import hash_init

    table = [TableSpec("t_Z", rows=50_000, dim=8, features=("Z",))]
    emb = CachedEmbeddings(table, emb_cfg(store="disk", path=str(tmp_path), warm_start="ids"), ADAGRAD, CPU)
    # Prefilled rows came from the (lazy) init: U(-1/sqrt(rows), 1/sqrt(rows)), mean ~0.
    w = emb.tbe.split_embedding_weights()[0].detach()
    torch.testing.assert_close(w, hash_init(0, torch.arange(500), 8, 50_000))
    bound = 1 / 50_000**0.5
    assert w.abs().max() <= bound and w.std() == pytest.approx(bound / 3**0.5, rel=0.05)
    assert not torch.equal(hash_init(1, torch.arange(500), 8, 50_000), w)  # per table
    # Nothing written yet; after a flush, rows read back from the files equal the cache's.
    assert (tmp_path / "t_Z.init.u8").read_bytes().count(1) == 0
    emb.flush()
    on_disk, _ = read_disk_table(tmp_path, "t_Z")
    np.testing.assert_array_equal(on_disk[:500], w.numpy())
    np.testing.assert_array_equal(on_disk[49_990:], hash_init(0, torch.arange(49_990, 50_000), 8, 50_000).numpy())


def test_tt_store_fills_from_online_counts_and_mean_pools():
    table = [TableSpec("t_T", rows=3_000, dim=8, features=("T",))]
    cfg = emb_cfg(store="tt", cache_rows=3, warm_start="none", tt_populate_step=2, pooling="mean",
                  tt={"rank": 4, "cores": 3, "optimizer": "sgd", "lr": 0.1})  # fmt: skip
    cached = CachedEmbeddings(table, cfg, ADAGRAD, CPU)
    cores = list(cached.tt.cores["t_T"])
    shape = cached.tt.shapes["t_T"]

    def bags(ids, lengths):
        return KeyedJaggedTensor.from_lengths_sync(keys=["T"], values=torch.tensor(ids), lengths=torch.tensor(lengths))

    with torch.no_grad():
        cached(bags([9, 9, 9, 5, 5, 77, 77], [3, 4]))
        assert (cached.caches["t_T"].id_of < 0).all()  # still counting: nothing cached yet
        cached(bags([5, 2000, 9, 1], [2, 2]))  # 2nd batch: fill with the top 3 of the counts
        assert sorted(cached.caches["t_T"].id_of.tolist()) == [5, 9, 77]  # counts 3, 4, 2
        out = cached(bags([9, 2000, 1], [2, 1])).values()
    rows = tt_rows(cores, shape, torch.tensor([9, 2000, 1]))
    torch.testing.assert_close(out, torch.stack([(rows[0] + rows[1]) / 2, rows[2]]))
