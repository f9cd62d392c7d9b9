"""Content recall from a user's history: recency-weighted mean of title embeddings, FAISS search."""

from __future__ import annotations

import gc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.build import BuildContext
from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.testing import CHECKS, StageCase
from stages.user_vector import ItemVectors, UserVectorRecall

TITLES = {
    "lip1": "red matte lipstick", "lip2": "long lasting red lipstick", "lip3": "pink lip gloss",
    "nail1": "red nail polish", "nail2": "clear nail polish top coat", "nail3": "nail polish remover",
    "hair1": "argan oil shampoo", "hair2": "hair conditioner with argan oil", "hair3": "dry shampoo spray",
    "eye1": "black eyeliner pencil", "eye2": "waterproof mascara", "eye3": "eye shadow palette",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("content")
    pq.write_table(pa.table({"item_id": list(TITLES), "title": list(TITLES.values())}), root / "items.parquet")
    stage = UserVectorRecall(index="content", device="cpu")
    stage._base_dir = root
    cfg = PipelineConfig(stages=[], data={"catalog": "items.parquet"}, base_dir=root)
    message = stage.build(None, BuildContext(cfg, progress=False, log=lambda m: None))
    assert "indexed 12 items" in message
    assert "up to date" in stage.build(None, BuildContext(cfg, progress=False, log=lambda m: None))
    return root


def recall(folder, **params):
    stage = UserVectorRecall(index="content", device="cpu", **params)
    stage._base_dir = folder
    return stage


def users(rows):
    return pa.table({"query_id": [r[0] for r in rows], "history": [r[1] for r in rows]},
                    schema=pa.schema([("query_id", pa.string()), ("history", pa.list_(pa.string()))]))


def test_user_vector_is_the_recency_weighted_mean(folder):
    vectors = ItemVectors.load(folder / "content")
    assert np.allclose(np.linalg.norm(vectors.vectors, axis=1), 1.0, atol=1e-5)
    hist = ["hair1", "eye1", "lip1"]
    rows = vectors.rows(hist)
    user = (0.25 * vectors.vectors[rows[0]] + 0.5 * vectors.vectors[rows[1]] + vectors.vectors[rows[2]])
    user /= np.linalg.norm(user)
    expected = {vectors.ids[i].as_py(): float(vectors.vectors[i] @ user) for i in range(len(vectors)) if i not in rows}
    out = recall(folder, k=4, recency=0.5)(users([("u", hist)]))
    got = dict(zip(out.column("item_id").to_pylist(), out.column("score").to_pylist()))
    best = sorted(expected, key=expected.get, reverse=True)[:4]
    assert list(got) == best
    assert np.allclose([got[i] for i in best], [expected[i] for i in best], atol=1e-5)


def test_item_vectors_view_a_normalised_flat_index_and_copy_the_rest():
    """A flat index of unit vectors is read in place (no second copy of the catalogue, read-only);
    unnormalised or non-flat indexes are read back and normalised, as before."""
    from indexes.faiss_index import FaissIndex

    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    ids = pa.array([f"i{i}" for i in range(50)])
    flat = FaissIndex.build(x, ids, factory="Flat", metric="ip", normalize=True)
    viewed = ItemVectors.from_index(flat)
    assert not viewed.vectors.flags.writeable and not viewed.vectors.flags.owndata
    assert np.array_equal(viewed.vectors, flat.vectors(np.arange(50)))
    kept = FaissIndex.build(x, ids, factory="Flat", metric="ip", normalize=True).stored_vectors()
    gc.collect()                                                                   # the view keeps its index
    assert isinstance(kept.base.owner, FaissIndex) and np.array_equal(kept, viewed.vectors)
    expected = x / np.linalg.norm(x, axis=1, keepdims=True)
    for index in (FaissIndex.build(x, ids, factory="Flat", metric="ip", normalize=False),
                  FaissIndex.build(x, ids, factory="HNSW8", metric="ip", normalize=True)):
        copied = ItemVectors.from_index(index)
        assert copied.vectors.flags.owndata and np.allclose(copied.vectors, expected, atol=1e-6)
    assert np.allclose(viewed.vectors, expected, atol=1e-6)


def test_recent_items_dominate_and_history_is_excluded(folder):
    out = recall(folder, k=3, recency=0.2)(users([("u", ["hair1", "nail1"]), ("v", ["nail1", "hair1"])]))
    by_user = {q: [r["item_id"] for r in out.to_pylist() if r["query_id"] == q] for q in ("u", "v")}
    assert by_user["u"][0].startswith("nail") and by_user["v"][0].startswith("hair")
    assert not {"hair1", "nail1"} & set(by_user["u"] + by_user["v"])
    assert [r["rank"] for r in out.to_pylist() if r["query_id"] == "u"] == [1, 2, 3]
    keep = recall(folder, k=3, recency=0.2, exclude_history=False)(users([("u", ["hair1", "nail1"])]))
    assert keep.column("item_id").to_pylist()[0] == "nail1"


def test_users_without_known_history_get_no_rows(folder):
    out = recall(folder, k=2)(users([("cold", []), ("unknown", ["nope"]), ("u", ["eye2"])]))
    assert set(out.column("query_id").to_pylist()) == {"u"}
    assert out.column("source").to_pylist() == ["content", "content"]


def test_bad_params():
    with pytest.raises(ConfigError, match="'recency' parameter of stage 'recall.user_vector'"):
        UserVectorRecall(recency=1.5).validate_params()
    with pytest.raises(ConfigError, match="'precision' parameter"):
        UserVectorRecall(precision="int3").validate_params()


@pytest.mark.parametrize("check", list(CHECKS))
def test_conformance(folder, check):
    batch = users([("a", ["lip1", "lip2"]), ("b", ["hair3"]), ("c", ["eye1", "nail2", "eye3"]), ("d", ["zzz"])])
    CHECKS[check](StageCase(recall(folder, k=3).clone(device="auto"), batch))


def test_torch_search_backend_gives_the_faiss_rows(folder):
    from pipeline.testing import assert_parity

    batch = users([("u1", ["lip1", "nail2"]), ("u2", ["hair3"]), ("u3", ["eye1", "eye2", "lip3"])])
    ref = recall(folder, k=5)(batch)
    stage = recall(folder, k=5, search_backend="torch", search_storage="bf16")
    got = stage(batch)
    assert stage.index_.backend == "torch-cpu"
    assert_parity(ref, got, atol=1e-5)
