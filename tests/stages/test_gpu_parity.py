"""CPU/GPU parity of every stage with a CUDA path, and the CUDA-only pieces of those paths.

All of it needs a CUDA device (``gpu`` marker: tests/conftest.py skips it, with the reason, where
torch sees none). Run on a CUDA machine with ``python -m pytest -m gpu`` after
``pip install -e '.[gpu,dev]'`` (see docs/gpu.md). The CPU-side logic of the same paths is
tested everywhere in test_gpu_paths.py.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from indexes.faiss_index import FaissIndex, faiss_has_gpu
from pipeline.build import BuildContext
from pipeline.config import PipelineConfig
from pipeline.testing import StageCase, assert_parity, assert_tables_close, check_cpu_gpu_parity

pytestmark = pytest.mark.gpu

needs_faiss_gpu = pytest.mark.skipif(not faiss_has_gpu(), reason="faiss without GPU support (install funnel-rank[gpu])")


def _clustered(n, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((20, d))
    return (centers[rng.integers(20, size=n)] + 0.3 * rng.standard_normal((n, d))).astype(np.float32)


def _knn_parity(cpu, gpu, k):
    """faiss' own tie-aware comparison of two result lists."""
    from faiss.contrib.evaluation import check_ref_knn_with_draws

    check_ref_knn_with_draws(cpu[0], cpu[1], gpu[0], gpu[1], k)


# -- faiss -----------------------------------------------------------------------------------


@needs_faiss_gpu
@pytest.mark.parametrize("factory, nprobe", [("Flat", None), ("IVF32,Flat", 32), ("IVF32,Flat", 4), ("IVF32,SQ8", 8)])
def test_faiss_gpu_clone_matches_cpu(factory, nprobe):
    x, q = _clustered(5000), _clustered(200, seed=1)
    index = FaissIndex.build(x, pa.array(np.arange(5000)), factory=factory)
    gpu = index.to_gpu()
    assert gpu.on_gpu and gpu._gpu_kind in ("flat", "ivf")
    _knn_parity(index.search(q, 50, nprobe=nprobe), gpu.search(q, 50, nprobe=nprobe), 50)


@needs_faiss_gpu
def test_faiss_hnsw_moves_to_gpu_or_recall_falls_back(tmp_path, caplog):
    from stages.faiss import FaissRecall

    x = _clustered(3000)
    FaissIndex.build(x, pa.array(np.arange(3000)), factory="HNSW32").save(tmp_path / "hnsw")
    queries = pa.table({"query_id": [f"q{i}" for i in range(20)],
                        "query_embedding": pa.array(_clustered(20, seed=2).tolist(), pa.list_(pa.float32()))})
    with caplog.at_level(logging.WARNING):
        gpu = FaissRecall(index=str(tmp_path / "hnsw"), k=20, ef_search=128, device="cuda")
        gpu.warm_up()
    if gpu.device_ == "cpu":  # no GPU HNSW in this faiss; torch would not give the graph's hits
        assert "searching on the CPU" in caplog.text
    else:
        assert gpu.index_._gpu_kind == "hnsw"
    assert_parity(FaissRecall(index=str(tmp_path / "hnsw"), k=20, ef_search=128, device="cpu")(queries),
                  gpu(queries), atol=1e-3)


@needs_faiss_gpu
def test_faiss_cagra_builds_on_gpu_and_searches_on_both(tmp_path):
    import faiss

    if not hasattr(faiss, "GpuIndexCagra"):
        pytest.skip("this faiss has no CAGRA (install faiss-gpu-cu12-cuvs)")
    x, q = _clustered(5000), _clustered(100, seed=1)
    index = FaissIndex.build(x, pa.array(np.arange(5000)), factory="CAGRA32")
    index.save(tmp_path / "cagra")
    loaded = FaissIndex.load(tmp_path / "cagra")
    gpu = loaded.to_gpu()
    assert gpu._gpu_kind == "cagra"
    exact = FaissIndex.build(x, pa.array(np.arange(5000)), factory="Flat").search(q, 10)
    for result in (loaded.search(q, 10, ef_search=64), gpu.search(q, 10), gpu.search(q, 100)):
        recall = np.mean([len(set(a) & set(b[:10])) / 10 for a, b in zip(exact[1], result[1])])
        assert recall > 0.9


@needs_faiss_gpu
def test_faiss_gpu_limits_fall_back_to_the_cpu_index(caplog):
    x = _clustered(6000)
    index = FaissIndex.build(x, pa.array(np.arange(6000)), factory="Flat")
    gpu = index.to_gpu()
    with caplog.at_level(logging.WARNING, logger="indexes.faiss_index"):
        got = gpu.search(x[:5], 3000)
    assert "k=3000 exceeds faiss-gpu's limit of 2048" in caplog.text
    np.testing.assert_array_equal(got[1], index.search(x[:5], 3000)[1])


@needs_faiss_gpu
def test_cuda_tensor_queries_are_searched_in_place():
    import torch

    x, q = _clustered(4000), _clustered(64, seed=3)
    for factory, nprobe in (("Flat", None), ("IVF32,Flat", 8)):
        gpu = FaissIndex.build(x, pa.array(np.arange(4000)), factory=factory).to_gpu()
        _knn_parity(gpu.search(q, 20, nprobe=nprobe), gpu.search(torch.from_numpy(q).cuda(), 20, nprobe=nprobe), 20)


@needs_faiss_gpu
def test_faiss_recall_parity_on_an_ivf_index(tmp_path):
    from stages.faiss import FaissRecall

    FaissIndex.build(_clustered(5000), pa.array([f"i{i}" for i in range(5000)]), factory="IVF64,Flat").save(tmp_path / "ivf")
    queries = pa.table({"query_id": [f"q{i}" for i in range(40)],
                        "query_embedding": pa.array(_clustered(40, seed=4).tolist(), pa.list_(pa.float32()))})
    check_cpu_gpu_parity(StageCase(FaissRecall(index=str(tmp_path / "ivf"), k=30, nprobe=16), queries))


# -- torch search on the GPU (faiss without GPU support, or search_backend="torch") -----------


@pytest.mark.parametrize("factory, nprobe", [("Flat", None), ("IVF64,Flat", 8), ("HNSW32", None)])
@pytest.mark.parametrize("storage", ["auto", "bf16", "int8"])
def test_recall_on_cuda_with_torch_search(tmp_path, factory, nprobe, storage):
    """`--device cuda` with faiss-cpu (CUDA 13) searches with torch; search_backend="torch" forces it anywhere."""
    from stages.faiss import FaissRecall

    FaissIndex.build(_clustered(5000), pa.array([f"i{i}" for i in range(5000)]), factory=factory).save(tmp_path / "ix")
    queries = pa.table({"query_id": [f"q{i}" for i in range(50)],
                        "query_embedding": pa.array(_clustered(50, seed=4).tolist(), pa.list_(pa.float32()))})
    backend = "auto" if not faiss_has_gpu() and factory != "HNSW32" else "torch"
    gpu = FaissRecall(index=str(tmp_path / "ix"), k=40, nprobe=nprobe, device="cuda", search_backend=backend,
                      search_storage=storage)
    gpu.warm_up()
    assert gpu.device_ == "cuda" and gpu.index_.backend == "torch-cuda"
    cpu = FaissRecall(index=str(tmp_path / "ix"), k=40, nprobe=nprobe, device="cpu")
    if factory.startswith("HNSW"):  # torch is exact, the graph approximate: compare with exact search
        FaissIndex.build(_clustered(5000), pa.array([f"i{i}" for i in range(5000)])).save(tmp_path / "flat")
        cpu = FaissRecall(index=str(tmp_path / "flat"), k=40, device="cpu")
    assert_parity(cpu(queries), gpu(queries), atol=1e-4)


def test_recall_on_cuda_never_fails_for_lack_of_faiss_gpu(tmp_path, demo_shop):
    """The demo's HNSW index: on the CPU with faiss-cpu (torch would not give the graph's hits),
    on the GPU with search_backend="torch"; a Flat index: torch on the GPU."""
    from stages.faiss import FaissRecall

    hnsw = FaissRecall(index=str(demo_shop / "artifacts" / "index"), k=100, device="cuda")
    hnsw.warm_up()
    assert hnsw.index_.backend in ("faiss-gpu", "faiss-cpu")
    exact = hnsw.clone(search_backend="torch")
    exact.warm_up()
    assert exact.device_ == "cuda" and exact.index_.backend == "torch-cuda"
    FaissIndex.build(_clustered(2000), pa.array(np.arange(2000))).save(tmp_path / "flat")
    flat = FaissRecall(index=str(tmp_path / "flat"), k=100, device="cuda")
    flat.warm_up()
    assert flat.device_ == "cuda" and flat.index_.backend in ("faiss-gpu", "torch-cuda")


# -- the demo pipeline's stages with a CUDA path ---------------------------------------------


def _step(pipe, name):
    return [s.name for s in pipe].index(name)


def test_encoder_parity_and_half_precision(demo_pipeline, demo_queries):
    from stages.sentence_transformers import SentenceTransformerEncoder

    check_cpu_gpu_parity(StageCase(SentenceTransformerEncoder(), demo_queries))
    texts = demo_queries.column("query").to_pylist()
    ref = SentenceTransformerEncoder(device="cpu").encode_texts(texts)
    for precision, min_cos in (("fp16", 0.999), ("bf16", 0.99)):
        got = SentenceTransformerEncoder(device="cuda", precision=precision, batch_size=256).encode_texts(texts)
        cos = (got * ref).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() > min_cos, f"{precision}: min cosine {cos.min()}"


def test_encoder_cuda_path_has_half_precision_weights_and_overlapped_loop(demo_queries):
    import torch

    from stages.sentence_transformers import SentenceTransformerEncoder

    texts = demo_queries.column("query").to_pylist() * 20
    ref = SentenceTransformerEncoder(device="cpu").encode_texts(texts)
    enc = SentenceTransformerEncoder(device="cuda", precision="fp16", batch_size=1024)
    got = enc.encode_texts(texts)
    assert next(enc.model_.parameters()).dtype == torch.float16
    cos = (got * ref).sum(axis=1)
    assert cos.min() >= 0.999, f"min cosine {cos.min()}"


def test_rule_filter_gpu_engine_gives_identical_rows(demo_pipeline, stage_inputs, caplog):
    from stages.rules import RuleFilter

    step = _step(demo_pipeline, "filter.rules")
    rules = demo_pipeline.stages[step].get_params()["rules"]
    for stage in (RuleFilter(rules=rules), RuleFilter(rules=rules, dedupe_by="brand")):
        with caplog.at_level(logging.WARNING, logger="stages.gpu_util"):
            gpu = stage.clone(device="cuda")(stage_inputs[step])
        assert_tables_close(gpu, stage.clone(device="cpu")(stage_inputs[step]), rtol=0, atol=0)
    try:
        import cudf_polars  # noqa: F401
    except ImportError:
        assert "Polars' GPU engine cannot run this query" in caplog.text


def test_ranker_scores_on_gpu_like_lightgbm(demo_pipeline, stage_inputs):
    step = _step(demo_pipeline, "rank.lightgbm")
    ranker, table = demo_pipeline.stages[step], stage_inputs[step]
    gpu = ranker.clone(device="cuda")
    gpu.warm_up()
    assert gpu.device_ == "cuda" and gpu.trees_ is not None and gpu.trees_.device == "cuda"
    assert_tables_close(gpu(table), ranker.clone(device="cpu")(table), rtol=0, atol=1e-6)
    check_cpu_gpu_parity(StageCase(ranker, table))


def test_mmr_display_parity(demo_shop, stage_inputs):
    from stages.mmr import MMRDisplay

    case = StageCase(MMRDisplay(n=10, mmr_lambda=0.5, index=str(demo_shop / "artifacts" / "index")), stage_inputs[-1])
    check_cpu_gpu_parity(case)


def test_fused_recall_parity(demo_shop, demo_queries):
    from stages.fusion import FusedRecall

    index = str(demo_shop / "artifacts" / "index")
    dense = [{"type": "encode.sentence_transformers"}, {"type": "recall.faiss", "params": {"index": index, "k": 30}}]
    wide = [{"type": "encode.sentence_transformers"}, {"type": "recall.faiss", "params": {"index": index, "k": 60}}]
    stage = FusedRecall(k=40, sources=[{"name": "a", "stages": dense}, {"name": "b", "weight": 0.5, "stages": wide}])
    check_cpu_gpu_parity(StageCase(stage, demo_queries))


def test_user_vector_recall_parity(tmp_path, demo_shop):
    from stages.user_vector import UserVectorRecall

    catalog = pq.read_table(demo_shop / "data" / "catalog.parquet").slice(0, 300)
    pq.write_table(catalog, tmp_path / "items.parquet")
    stage = UserVectorRecall(index="content", k=20)
    stage._base_dir = tmp_path
    stage.build(None, BuildContext(PipelineConfig(stages=[], data={"catalog": "items.parquet"}, base_dir=tmp_path),
                                   progress=False, log=lambda m: None))
    ids = catalog.column("item_id").to_pylist()
    users = pa.table({"query_id": [f"u{i}" for i in range(10)],
                      "history": pa.array([[str(ids[(7 * i + j) % len(ids)]) for j in range(1 + i % 4)] for i in range(10)],
                                          pa.list_(pa.string()))})
    check_cpu_gpu_parity(StageCase(stage, users))
