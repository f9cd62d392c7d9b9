"""features.vectors, and catalog vector columns end to end: a generated shop whose item vectors
carry the signal (latent clusters) while titles are noise must gain in recall and in ranking."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from indexes.faiss_index import FaissIndex
from pipeline.build import BuildContext, build_artifacts, run_batches
from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError, DataError
from pipeline.testing import CHECKS, StageCase
from stages.user_vector import UserVectorRecall
from stages.vector_features import VectorFeatures

WORDS = "soft glow velvet pure daily fresh silk dew rose mint clear bright calm deep bold lush".split()


def clustered_shop(root, *, clusters=12, per_cluster=10, dim=16, users=360, seed=0, fixed_size=False):
    """A catalog whose ``image`` vectors sit near one of ``clusters`` centres and whose titles (and
    ``noise`` vectors) are random, and users who each buy 4-7 items of one cluster (the last one held out)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    n = clusters * per_cluster
    cluster = np.repeat(np.arange(clusters), per_cluster)
    vectors = (centres[cluster] + 0.35 * rng.normal(size=(n, dim))).astype(np.float32)
    ids = [f"I{i:03d}" for i in range(n)]
    titles = [" ".join(rng.choice(WORDS, 4)) for i in range(n)]
    noise = rng.normal(size=(n, dim)).astype(np.float32)    # a vector source that knows nothing
    vtype = pa.list_(pa.float32(), dim) if fixed_size else pa.list_(pa.float32())
    pq.write_table(pa.table({"item_id": ids, "title": titles, "image": pa.array(list(vectors), vtype),
                             "noise": pa.array(list(noise), vtype)}), root / "items.parquet")
    seqs = []
    for _ in range(users):
        c = rng.integers(clusters)
        picks = rng.choice(np.flatnonzero(cluster == c), rng.integers(4, 8), replace=False)
        seqs.append([ids[i] for i in picks])
    names = [f"U{u}" for u in range(users)]
    pq.write_table(pa.table({"user_id": names, "items": seqs}), root / "logs.parquet")
    # evaluation users: new users of the same kind, their last item held out
    evals = []
    for _ in range(users // 3):
        c = rng.integers(clusters)
        evals.append([ids[i] for i in rng.choice(np.flatnonzero(cluster == c), rng.integers(4, 8), replace=False)])
    queries = pa.table({"query_id": [f"E{u}" for u in range(len(evals))], "history": [s[:-1] for s in evals]})
    judgments = pa.table({"query_id": queries.column("query_id"), "item_id": [s[-1] for s in evals],
                          "relevance": np.ones(len(evals))})
    return queries, judgments


def config(root, stages, data=None) -> PipelineConfig:
    if not stages:
        return PipelineConfig(stages=[], data=data or {"catalog": "items.parquet", "logs": "logs.parquet"},
                              base_dir=root)
    doc = {"pipeline": {"name": "t", "inputs": {"query_id": "string", "history": "list<string>"}},
           "data": data or {"catalog": "items.parquet", "logs": "logs.parquet"}, "stages": stages}
    return PipelineConfig.from_dict(doc, base_dir=root)


def build_and_run(root, stages, queries) -> pa.Table:
    cfg = config(root, stages)
    pipe = build_artifacts(cfg, progress=False, log=lambda m: None)
    pipe.warm_up()
    return run_batches(pipe, queries, progress=False, desc="t")


def at_10(run: pa.Table, judgments: pa.Table) -> tuple[float, float]:
    """(Recall@10, NDCG@10) with one relevant item per query (ranx's numba start-up costs 20 s)."""
    target = dict(zip(judgments.column("query_id").to_pylist(), judgments.column("item_id").to_pylist()))
    ranks = (pl.from_arrow(run.select(["query_id", "item_id", "score"]))
             .sort(["query_id", "score"], descending=[False, True])
             .with_columns(pl.int_range(1, pl.len() + 1).over("query_id").alias("r")).filter(pl.col("r") <= 10))
    hit = {q: r for q, i, r in ranks.select("query_id", "item_id", "r").iter_rows() if target.get(q) == i}
    return len(hit) / len(target), sum(1 / np.log2(r + 1) for r in hit.values()) / len(target)


def user_vector(index, **params):
    return {"type": "recall.user_vector", "params": {"index": index, "k": 10, "device": "cpu", **params}}


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("clustered")
    return root, *clustered_shop(root)


def recall_at_10(root, stages, queries, judgments) -> float:
    return at_10(build_and_run(root, stages, queries), judgments)[0]


def fused(first: str, first_params: dict, weight: float) -> list[dict]:
    # "weighted" fusion: RRF flattens ranks, and a weak source's top hits then outweigh the 5th
    # hit of a strong source (RRF here: recall@10 0.68 with the noise source at weight 0.3)
    return [{"type": "recall.fused", "params": {"k": 10, "method": "weighted", "sources": [
        {"name": first, "weight": weight, "stages": [user_vector(first, k=50, **first_params)]},
        {"name": "image", "stages": [user_vector("image", k=50, vector_column="image")]}]}}]


def test_vector_column_recall_finds_what_noise_does_not_and_fuses(shop):
    root, queries, judgments = shop
    r = {"noise": recall_at_10(root, [user_vector("noise", vector_column="noise")], queries, judgments),
         "image": recall_at_10(root, [user_vector("image", vector_column="image", source="image")], queries, judgments),
         "fused": recall_at_10(root, fused("noise", {"vector_column": "noise"}, 0.3), queries, judgments)}
    # 10 items per cluster, 3-6 of them in the history: the image source finds the held-out one
    assert r["image"] > 0.9 and r["noise"] < 0.25 and r["fused"] > 0.85, r
    index = FaissIndex.load(root / "image")
    assert index.encoder == "column:image" and index.ntotal == 120 and index.dim == 16


@pytest.mark.long
def test_image_vectors_beat_and_fuse_with_title_text(shop):
    """The same with real title embeddings (all-MiniLM-L6-v2, about 30 s on 2 loaded cores)."""
    root, queries, judgments = shop
    title = recall_at_10(root, [user_vector("title")], queries, judgments)
    both = recall_at_10(root, fused("title", {}, 0.3), queries, judgments)
    assert title < 0.3 and both > title + 0.5, (title, both)


def ranker_stages(with_vectors: bool) -> list[dict]:
    feats = [{"type": "features.history", "params": {
        "association": None, "content": None, "popularity": "pop", "features": ["pop_count", "history_len"],
        "copy_columns": ["score", "rank"]}}]
    if with_vectors:
        feats.append({"type": "features.vectors", "params": {"index": "image", "source": "image"}})
    model = "ranker_img" if with_vectors else "ranker_plain"
    return [
        {"type": "recall.popularity", "params": {"index": "pop", "k": 120}},
        {"type": "filter.history", "params": {}},
        *feats,
        {"type": "rank.lightgbm", "params": {"model": model, "holdout_fraction": 0.0, "num_threads": 1,
                                             "min_data_in_leaf": 20}},
    ]


@pytest.mark.slow
def test_vector_features_give_the_ranker_the_signal(shop):
    root, queries, judgments = shop
    # the image index comes from recall.user_vector's build; here a recall stage that returns nothing
    # useful would do as well, so build it directly
    stage = UserVectorRecall(index="image", vector_column="image")
    stage._base_dir = root
    stage.build(None, BuildContext(config(root, []), progress=False, log=lambda m: None))
    ndcg = {}
    for with_vectors in (False, True):
        run = build_and_run(root, ranker_stages(with_vectors), queries)
        ndcg[with_vectors] = at_10(run, judgments)[1]
    assert ndcg[False] < 0.2, ndcg            # popularity alone: uniform shop, near random
    assert ndcg[True] > ndcg[False] + 0.25, ndcg


# -- the stage on hand-made vectors -----------------------------------------------------------


@pytest.fixture(scope="module")
def index_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vecfeat")
    vectors = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    FaissIndex.build(vectors, pa.array(["a", "b", "c", "d"])).save(root / "image")
    return root


def candidates(rows):
    """rows: (query_id, history, [item ids in rank order])."""
    out = [(q, h, item, r) for q, h, items in rows for r, item in enumerate(items, 1)]
    return pa.table({"query_id": [o[0] for o in out], "history": [o[1] for o in out],
                     "item_id": [o[2] for o in out], "rank": pa.array([o[3] for o in out], pa.int32())},
                    schema=pa.schema([("query_id", pa.string()), ("history", pa.list_(pa.string())),
                                      ("item_id", pa.string()), ("rank", pa.int32())]))


def vec(root, **params):
    stage = VectorFeatures(index="image", **params)
    stage._base_dir = root
    return stage


def test_history_mode_values_by_hand(index_root):
    out = vec(index_root, recency=0.5)(candidates([("u", ["a", "b"], ["c", "d", "zz"]), ("v", [], ["a"])])).to_pylist()
    c, d, unknown, cold = out
    assert c["f_sim_last_image"] == pytest.approx(0.8) and c["f_sim_max_image"] == pytest.approx(0.8)
    assert c["f_sim_mean_image"] == pytest.approx((0.8 + 0.5 * 0.0) / 1.5)
    assert d["f_sim_last_image"] == pytest.approx(0.0)
    assert np.isnan(unknown["f_sim_last_image"]) and np.isnan(cold["f_sim_max_image"])


def test_results_mode_compares_with_the_top_results(index_root):
    stage = vec(index_root, mode="results", top_m=2, source="img2")
    assert stage.produced_columns().names == ["f_sim_top_img2", "f_sim_top1_img2"]
    out = stage(candidates([("q", [], ["a", "b", "c", "zz"])])).to_pylist()
    centre = np.array([1.6, 0.8, 0]) / np.linalg.norm([1.6, 0.8, 0])
    assert [r["f_sim_top_img2"] for r in out[:3]] == pytest.approx([centre[0], centre @ [0.6, 0.8, 0], centre[1]])
    assert [r["f_sim_top1_img2"] for r in out[:3]] == pytest.approx([1.0, 0.6, 0.0])
    assert np.isnan(out[3]["f_sim_top_img2"])


def test_params_and_round_trip():
    with pytest.raises(ConfigError, match="'source' parameter of stage 'features.vectors'"):
        VectorFeatures(source="a b").validate_params()
    with pytest.raises(ConfigError, match="'mode' parameter"):
        VectorFeatures(mode="query").validate_params()
    with pytest.raises(ConfigError, match="'top_m' parameter"):
        VectorFeatures(top_m=0).validate_params()
    stage = VectorFeatures(index="artifacts/img", source="img", mode="results", top_m=5)
    assert stage.clone().get_params() == stage.get_params()
    assert "rank" in stage.required_columns().names
    assert "history" in VectorFeatures().required_columns().names


@pytest.mark.parametrize("check", [c for c in CHECKS if c != "cpu_gpu_parity"])
def test_conformance(index_root, check):
    batch = candidates([("u", ["a", "b"], ["c", "d", "zz"]), ("v", [], ["a"]), ("w", ["d"], ["a", "b"])])
    CHECKS[check](StageCase(vec(index_root), batch))
    CHECKS[check](StageCase(vec(index_root, mode="results"), batch, id="features.vectors-results"))


# -- building from a catalog column -----------------------------------------------------------


def test_vector_column_build_key_and_bad_vectors(tmp_path):
    clustered_shop(tmp_path, users=10, fixed_size=True)
    cfg = config(tmp_path, [])
    lines = []
    ctx = BuildContext(cfg, progress=False, log=lines.append)
    stage = UserVectorRecall(index="image", vector_column="image")
    stage._base_dir = tmp_path
    assert "indexed 120 item vectors from column 'image'" in stage.build(None, ctx)
    assert "up to date" in stage.build(None, ctx)
    table = pq.read_table(tmp_path / "items.parquet")
    vectors = table.column("image").to_pylist()
    vectors[3], vectors[5] = None, [0.0] * 16
    pq.write_table(table.set_column(2, "image", pa.array(vectors, pa.list_(pa.float32()))), tmp_path / "items.parquet")
    message = stage.build(None, ctx)          # the catalog changed: rebuilt
    assert "indexed 118 item vectors" in message and "1 without a vector, 1 of norm 0 left out" in message
    vectors[7] = [1.0] * 15
    pq.write_table(table.set_column(2, "image", pa.array(vectors, pa.list_(pa.float32()))), tmp_path / "items.parquet")
    with pytest.raises(DataError, match=r"column 'image' has vectors of dimension 16 but item 'I007' has 15"):
        stage.build(None, ctx)
    vectors[7] = [float("nan")] * 16
    pq.write_table(table.set_column(2, "image", pa.array(vectors, pa.list_(pa.float32()))), tmp_path / "items.parquet")
    with pytest.raises(DataError, match=r"column 'image' has NaN or infinite values in the vector of item 'I007'"):
        stage.build(None, ctx)
    with pytest.raises(DataError, match=r"column 'title' must hold one vector per item .* found string"):
        UserVectorRecall(index="x", vector_column="title").build(None, ctx)
    with pytest.raises(DataError, match=r"lacks column\(s\) nope"):
        UserVectorRecall(index="x", vector_column="nope").build(None, ctx)


def test_recall_faiss_indexes_a_vector_column_for_query_vectors(tmp_path):
    """recall.faiss with vector_column: queries embedded elsewhere in the same space (e.g. CLIP text)."""
    clustered_shop(tmp_path, users=10)
    cfg = config(tmp_path, [])
    from stages.faiss import FaissRecall

    stage = FaissRecall(index="image", vector_column="image", k=5, device="cpu")
    stage._base_dir = tmp_path
    assert "from column 'image'" in stage.build(None, BuildContext(cfg, progress=False, log=lambda m: None))
    items = pl.read_parquet(tmp_path / "items.parquet")
    query = np.asarray(items["image"][11].to_list(), np.float32)          # item I011's own vector
    out = stage(pa.table({"query_id": ["q"], "query_embedding": pa.array([query.tolist()], pa.list_(pa.float32()))}))
    assert out.column("item_id")[0].as_py() == "I011"
    assert all(int(i[1:]) // 10 == 1 for i in out.column("item_id").to_pylist())   # its cluster


@pytest.fixture(scope="module")
def small_shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("vecrecall")
    queries, _ = clustered_shop(root, users=12)
    ctx = BuildContext(config(root, []), progress=False, log=lambda m: None)
    from stages.faiss import FaissRecall

    for cls in (UserVectorRecall, FaissRecall):
        stage = cls(index=f"image_{cls.__name__}", vector_column="image")
        stage._base_dir = root
        stage.build(None, ctx)
    return root, queries


def _vector_recalls(root):
    from stages.faiss import FaissRecall

    stages = [UserVectorRecall(index="image_UserVectorRecall", vector_column="image", k=5),
              FaissRecall(index="image_FaissRecall", vector_column="image", k=5)]
    for s in stages:
        s._base_dir = root
    return stages


def _check_params():
    for check in CHECKS:
        marks = [pytest.mark.gpu] if check == "cpu_gpu_parity" else []
        yield pytest.param(check, marks=marks, id=check)


@pytest.mark.parametrize("check", list(_check_params()))
def test_recall_from_a_vector_column_conforms(small_shop, check):
    """Both recall stages built from a catalog column pass the kit, CPU/GPU parity included (gpu)."""
    root, queries = small_shop
    users, faiss_recall = _vector_recalls(root)
    rows = pq.read_table(root / "items.parquet").slice(0, 6)
    embedded = pa.table({"query_id": [f"q{i}" for i in range(6)],
                         "query_embedding": pa.array(rows.column("image").to_pylist(), pa.list_(pa.float32()))})
    CHECKS[check](StageCase(users, queries.slice(0, 8), id="recall.user_vector-vector_column"))
    CHECKS[check](StageCase(faiss_recall, embedded, id="recall.faiss-vector_column"))


# -- search: the query has no image vector; the best text results stand in for it -------------


def search_shop(root, *, seed=1, per_query=8):
    """Clusters in pairs share a kind word; a few items of each cluster also carry the cluster's
    own word. A query "<kind> <own word>" means one cluster of the pair: BM25 puts the items with
    both words first and cannot tell the rest of the two clusters apart; their image vectors can."""
    rng = np.random.default_rng(seed)
    clusters, per_cluster, dim = 8, 10, 16
    centres = rng.normal(size=(clusters, dim))
    n = clusters * per_cluster
    cluster = np.repeat(np.arange(clusters), per_cluster)
    vectors = (centres[cluster] + 0.35 * rng.normal(size=(n, dim))).astype(np.float32)
    kinds, own = ["lipstick", "mascara", "shampoo", "perfume"], ["matte", "gloss", "volume", "curl", "argan",
                                                                 "mint", "amber", "citrus"]
    titles = [" ".join([kinds[c // 2], *([own[c]] if i % per_cluster < 3 else []), *rng.choice(WORDS, 2)])
              for i, c in enumerate(cluster)]
    ids = [f"I{i:03d}" for i in range(n)]
    pq.write_table(pa.table({"item_id": ids, "title": titles, "image": pa.array(list(vectors), pa.list_(pa.float32()))}),
                   root / "items.parquet")
    rows = []
    for q in range(clusters * per_query):
        c = q % clusters
        for i in np.flatnonzero(cluster // 2 == c // 2):
            rows.append((f"Q{q}", f"{kinds[c // 2]} {own[c]}", ids[i], 3.0 if cluster[i] == c else 1.0))
    judgments = pa.table({"query_id": [r[0] for r in rows], "query": [r[1] for r in rows],
                          "item_id": [r[2] for r in rows], "relevance": [r[3] for r in rows]})
    pq.write_table(judgments, root / "judgments.parquet")
    queries = pl.from_arrow(judgments).select("query_id", "query").unique(maintain_order=True).to_arrow()
    return queries, judgments


def search_stages(with_vectors: bool) -> list[dict]:
    feats = [{"type": "features.vectors", "params": {"index": "image", "source": "image", "mode": "results",
                                                     "top_m": 3}}] if with_vectors else []
    return [
        {"type": "recall.bm25", "params": {"index": "bm25", "k": 30, "item_text": ["title"]}},
        {"type": "lookup.catalog", "params": {"items": "items_lookup", "columns": ["title"]}},
        {"type": "features.text", "params": {"features": ["recall_score", "recall_rank", "overlap", "coverage"]}},
        *feats,
        {"type": "rank.lightgbm", "params": {"model": "ranker_img" if with_vectors else "ranker_plain",
                                             "holdout_fraction": 0.0, "num_threads": 1, "min_data_in_leaf": 10}},
    ]


@pytest.mark.slow
def test_results_mode_gives_search_the_image_signal(tmp_path):
    """BM25 + text features + LightGBM: precision@10 of the meant cluster 0.74; + features.vectors
    in results mode: 1.0 (2026-12-01). About 15-25 s on 2 loaded cores: marked slow."""
    queries, judgments = search_shop(tmp_path)
    stage = UserVectorRecall(index="image", vector_column="image")
    stage._base_dir = tmp_path
    cfg = config(tmp_path, [], data={"catalog": "items.parquet", "judgments": "judgments.parquet"})
    stage.build(None, BuildContext(cfg, progress=False, log=lambda m: None))
    relevant = pa.table({"query_id": judgments.column("query_id").filter(pc_equal(judgments.column("relevance"), 3.0)),
                         "item_id": judgments.column("item_id").filter(pc_equal(judgments.column("relevance"), 3.0))})
    prec = {}
    for with_vectors in (False, True):
        doc = {"pipeline": {"name": "s", "inputs": {"query_id": "string", "query": "string"}},
               "data": {"catalog": "items.parquet", "judgments": "judgments.parquet"},
               "stages": search_stages(with_vectors)}
        pipe = build_artifacts(PipelineConfig.from_dict(doc, base_dir=tmp_path), progress=False, log=lambda m: None)
        pipe.warm_up()
        prec[with_vectors] = precision_at_10(run_batches(pipe, queries, progress=False, desc="t"), relevant)
    assert prec[True] > prec[False] + 0.2, prec


def pc_equal(column, value):
    import pyarrow.compute as pc

    return pc.equal(column, value)


def precision_at_10(run: pa.Table, relevant: pa.Table) -> float:
    """Share of the top 10 (by score) that are in the query's intended cluster (10 such items)."""
    rel = set(zip(relevant.column("query_id").to_pylist(), relevant.column("item_id").to_pylist()))
    top = (pl.from_arrow(run.select(["query_id", "item_id", "score"])).sort(["query_id", "score"], descending=[False, True])
           .group_by("query_id", maintain_order=True).head(10))
    hits = sum((q, i) in rel for q, i in top.select("query_id", "item_id").iter_rows())
    return hits / (10 * top.get_column("query_id").n_unique())
