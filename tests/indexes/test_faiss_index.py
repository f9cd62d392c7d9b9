import json
import re

import faiss
import numpy as np
import pyarrow as pa
import pytest

from indexes import FaissIndex
from pipeline.artifacts import MANIFEST
from pipeline.errors import ArtifactError, ConfigError, DataError, DeviceError

N, D = 2000, 32


def clustered(n=N, d=D, clusters=20, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d))
    points = centers[rng.integers(clusters, size=n)] + 0.3 * rng.standard_normal((n, d))
    return points.astype(np.float32)


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    x = clustered()
    return x, clustered(50, seed=1)


@pytest.fixture(scope="module")
def ids():
    return pa.array(np.arange(N, dtype=np.int64) * 10)


def test_flat_ip_is_exact(data, ids):
    x, q = data
    index = FaissIndex.build(x, ids, factory="Flat", metric="ip", encoder="m")
    scores, positions = index.search(q, 10)
    truth = unit(q) @ unit(x).T
    expected = np.argsort(-truth, axis=1)[:, :10]
    assert scores.dtype == np.float32 and positions.dtype == np.int64
    np.testing.assert_array_equal(positions, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(truth, expected, axis=1), rtol=1e-4, atol=1e-5)
    assert index.ids_for(positions[:1]).to_pylist() == (expected[0] * 10).tolist()


def test_flat_l2_unnormalised_is_exact(data, ids):
    x, q = data
    index = FaissIndex.build(x, ids, metric="l2", normalize=False)
    scores, positions = index.search(q, 5)
    dist = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.testing.assert_array_equal(positions, np.argsort(dist, axis=1)[:, :5])
    np.testing.assert_allclose(scores, np.sort(dist, axis=1)[:, :5], rtol=1e-3)


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF16,Flat"])
def test_save_load_round_trip(tmp_path, data, ids, factory):
    x, q = data
    built = FaissIndex.build(x, ids, factory=factory, encoder="enc-a")
    before = built.search(q, 10)
    built.save(tmp_path / "idx", extra={"build_key": "abc123"})
    loaded = FaissIndex.load(tmp_path / "idx", expected_dim=D, expected_encoder="enc-a")
    after = loaded.search(q, 10)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    assert loaded.ids.equals(ids)
    assert (loaded.dim, loaded.ntotal, loaded.metric, loaded.encoder, loaded.factory) == (D, N, "ip", "enc-a", factory)
    manifest = json.loads((tmp_path / "idx" / MANIFEST).read_text())
    assert manifest["kind"] == "faiss" and manifest["build_key"] == "abc123"
    assert manifest["count"] == N and manifest["dim"] == D and manifest["normalize"] is True
    assert set(manifest["files"]) == {"index.faiss", "ids.parquet"}
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["ids.parquet", "index.faiss", MANIFEST]


def test_hnsw_and_ivf_recall(data, ids):
    x, q = data
    exact = FaissIndex.build(x, ids).search(q, 10)[1]
    hnsw = FaissIndex.build(x, ids, factory="HNSW32")

    def recall(ef_search):
        found = hnsw.search(q, 10, ef_search=ef_search)[1]
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, found)])

    assert recall(256) > 0.95 and recall(256) > recall(16)
    ivf = FaissIndex.build(x, ids, factory="IVF16,Flat", train_size=500, seed=3)
    np.testing.assert_array_equal(ivf.search(q, 10, nprobe=16)[1], exact)


def test_ivf_small_nprobe_returns_minus_one(data, ids):
    x, q = data
    ivf = FaissIndex.build(x, ids, factory="IVF16,Flat")
    scores, positions = ivf.search(q[:3], 1500, nprobe=1)
    assert (positions == -1).any()
    assert ivf.ids_for(np.array([[-1, 0]])).to_pylist() == [None, 0]


def test_string_ids_round_trip(tmp_path, data):
    x, q = data
    sids = pa.array([f"sku-{i}" for i in range(N)])
    FaissIndex.build(x, sids).save(tmp_path)
    loaded = FaissIndex.load(tmp_path)
    _, positions = loaded.search(x[:2], 1)
    assert loaded.ids_for(positions).to_pylist() == ["sku-0", "sku-1"]


@pytest.fixture()
def saved(tmp_path, data, ids):
    FaissIndex.build(data[0][:300], ids[:300], encoder="enc-a").save(tmp_path / "idx")
    return tmp_path / "idx"


def test_flipped_bytes_fail_checksum(saved):
    path = saved / "index.faiss"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="corrupted.*sha256"):
        FaissIndex.load(saved)


def test_truncated_file_fails_checksum(saved):
    path = saved / "index.faiss"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="sha256"):
        FaissIndex.load(saved)


def test_missing_folder_and_file(tmp_path, saved):
    with pytest.raises(ArtifactError, match="not found.*funnel build"):
        FaissIndex.load(tmp_path / "nowhere")
    (saved / "ids.parquet").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        FaissIndex.load(saved)


def test_dimension_mismatch(saved):
    with pytest.raises(ArtifactError, match=re.escape(f"index at {saved} has dimension {D}") + " but the encoder produces 768"):
        FaissIndex.load(saved, expected_dim=768)


def test_encoder_mismatch(saved):
    with pytest.raises(ArtifactError, match="built with encoder enc-a but the pipeline encodes queries with enc-b; rebuild"):
        FaissIndex.load(saved, expected_encoder="enc-b")


def test_count_mismatch(saved):
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["count"] = 999
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="300 vectors.*300 ids.*999"):
        FaissIndex.load(saved)


def test_save_replaces_previous_index(saved, data, ids):
    FaissIndex.build(data[0][:100], ids[:100], encoder="enc-b").save(saved)
    loaded = FaissIndex.load(saved)
    assert (loaded.ntotal, loaded.encoder) == (100, "enc-b")
    assert not [p for p in saved.iterdir() if p.name.endswith(".tmp")]


def test_build_errors(data, ids):
    x, _ = data
    with pytest.raises(ConfigError, match="Bogus"):
        FaissIndex.build(x, ids, factory="Bogus")
    with pytest.raises(ConfigError, match="metric"):
        FaissIndex.build(x, ids, metric="cosine")
    with pytest.raises(DataError, match="2000 embeddings but 10 item ids"):
        FaissIndex.build(x, ids[:10])
    with pytest.raises(DataError, match="training"):
        FaissIndex.build(x[:8], ids[:8], factory="IVF16,Flat")
    with pytest.raises(ConfigError, match="nprobe applies to IVF"):
        FaissIndex.build(x, ids).search(x[:1], 1, nprobe=4)
    with pytest.raises(DataError, match="dimension 32; the queries have 8"):
        FaissIndex.build(x, ids).search(x[:1, :8], 1)


@pytest.mark.skipif(hasattr(faiss, "StandardGpuResources"), reason="faiss has GPU support")
def test_to_gpu_without_gpu_faiss(data, ids):
    with pytest.raises(DeviceError, match=r"without GPU support; install funnel-rank\[gpu\]"):
        FaissIndex.build(data[0], ids).to_gpu()


@pytest.mark.gpu
def test_to_gpu_matches_cpu(data, ids):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x, q = data
    index = FaissIndex.build(x, ids, factory="IVF16,Flat")
    if not hasattr(faiss, "StandardGpuResources"):
        with pytest.raises(DeviceError):
            index.to_gpu()
        return
    gpu = index.to_gpu()
    assert gpu.on_gpu
    cpu_scores, cpu_positions = index.search(q, 10, nprobe=16)
    gpu_scores, gpu_positions = gpu.search(q, 10, nprobe=16)
    np.testing.assert_array_equal(cpu_positions, gpu_positions)
    np.testing.assert_allclose(cpu_scores, gpu_scores, rtol=1e-4, atol=1e-5)


# -- building from shards, factory "auto" (issue 20) ------------------------------------------

class Shards:
    """Shards read again on every iteration (as from files), counting the passes."""

    def __init__(self, x, ids, rows):
        self.parts = [(ids.slice(i, rows), x[i:i + rows].copy()) for i in range(0, len(x), rows)]
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return ((ids, v.copy()) for ids, v in self.parts)


def test_from_shards_equals_build_for_flat(data, ids):
    x, q = data
    one = FaissIndex.build(x, ids, factory="Flat")
    shards = Shards(x, ids, 300)
    sharded = FaissIndex.from_shards(shards, count=N, dim=D, factory="Flat")
    assert shards.passes == 1 and sharded.ids.equals(one.ids)
    np.testing.assert_array_equal(sharded.vectors(np.arange(N)), one.vectors(np.arange(N)))
    for a, b in zip(sharded.search(q, 10), one.search(q, 10)):
        np.testing.assert_array_equal(a, b)


def test_from_shards_trains_on_the_same_sample_as_build(data, ids):
    x, q = data
    one = FaissIndex.build(x, ids, factory="IVF16,Flat", train_size=700, seed=3)
    shards = Shards(x, ids, 300)
    sharded = FaissIndex.from_shards(shards, count=N, dim=D, factory="IVF16,Flat", train_size=700, seed=3)
    assert shards.passes == 2                                            # a sample pass, an add pass
    for a, b in zip(sharded.search(q, 10, nprobe=4), one.search(q, 10, nprobe=4)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(DataError, match="300 embeddings but 299 item ids"):
        FaissIndex.from_shards([(ids.slice(0, 299), x[:300])], count=300)


def test_auto_factory_follows_the_item_count():
    from indexes.faiss_index import auto_factory, build_memory, train_rows

    assert auto_factory(199_999) == ("Flat", None)
    assert auto_factory(200_000) == ("IVF2048,Flat", 16)
    assert auto_factory(1_000_000) == ("IVF4096,Flat", 16)
    assert auto_factory(10_000_000) == ("IVF16384,Flat", 16)
    assert train_rows("Flat", 10**6, 384) == 0 and train_rows("auto", 10**6, 384) == 64 * 4096
    assert train_rows("IVF16,Flat", 2000, 32) == 2000                       # capped by the items
    flat = build_memory("Flat", 10**6, 384, 65_536)
    assert flat == 4 * 384 * (10**6 + 2 * 65_536)
    assert build_memory("auto", 10**6, 384, 65_536) == 4 * 384 * (10**6 + 64 * 4096 + 2 * 65_536) + 8 * 10**6
    assert build_memory("HNSW16", 10**6, 384, 65_536) == flat + 8 * 16 * 10**6


def test_auto_index_records_its_factory_and_nprobe(data, ids, tmp_path, monkeypatch):
    from indexes import faiss_index

    x, q = data
    assert FaissIndex.build(x, ids, factory="auto").factory == "Flat"
    monkeypatch.setattr(faiss_index, "AUTO_FLAT_BELOW", 1000)           # 2,000 items count as large
    index = FaissIndex.from_shards(Shards(x, ids, 500), count=N, factory="auto")
    assert index.factory == "IVF128,Flat" and index.nprobe == 16
    index.save(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert (manifest["factory"], manifest["nprobe"], manifest["chosen_by"]) == ("IVF128,Flat", 16, "auto")
    loaded = FaissIndex.load(tmp_path)
    assert loaded.nprobe == 16
    for a, b in zip(loaded.search(q, 10), loaded.search(q, 10, nprobe=16)):   # the stored nprobe is used
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(loaded.search(q, 10)[1], loaded.search(q, 10, nprobe=1)[1])
