"""Torch k-NN search (indexes/torch_search.py) against faiss' exact search, on the CPU.

The same class runs on CUDA in recall stages whose faiss has no GPU support; these CPU runs are
its parity tests in CI (fp16 on the CPU where this torch has fp16 matrix products: 2.13 has).
"""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pytest
import torch
from faiss.contrib.evaluation import check_ref_knn_with_draws

from indexes.faiss_index import FaissIndex
from indexes.torch_search import FLT_MAX, TorchSearch, kmeans
from pipeline.errors import ConfigError, DataError

D = 48


def _clustered(n, seed=0, normalize=True):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((25, D))
    x = (centers[rng.integers(25, size=n)] + 0.4 * rng.standard_normal((n, D))).astype(np.float32)
    if normalize:
        faiss.normalize_L2(x)
    return x


@pytest.fixture(scope="module")
def data():
    x = _clustered(4000)
    q = _clustered(150, seed=3)
    return x, q


def _exact(x, q, k, metric):
    index = faiss.IndexFlatIP(D) if metric == "ip" else faiss.IndexFlatL2(D)
    index.add(x)
    return index.search(q, k)


def _recall(ref, got):
    return np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(ref, got)])


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("storage", ["fp32", "fp16", "bf16", "int8"])
def test_matches_exact_faiss_search_up_to_ties(data, metric, storage):
    x, q = data
    ref = _exact(x, q, 50, metric)
    got = TorchSearch(x, metric=metric, storage=storage, query_batch=64).search(q, 50)
    assert got[0].dtype == np.float32 and got[1].dtype == np.int64
    check_ref_knn_with_draws(ref[0], ref[1], got[0], got[1], 50)
    np.testing.assert_allclose(got[0], ref[0], atol=2e-5)


@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_low_precision_scan_recall_after_fp32_rescoring(storage):
    x = _clustered(20000, seed=5)
    q = _clustered(200, seed=6)
    ref = _exact(x, q, 100, "ip")[1]
    assert _recall(ref, TorchSearch(x, storage=storage).search(q, 100)[1]) >= 0.999


@pytest.mark.parametrize("storage", ["fp32", "bf16", "int8"])
def test_chunking_over_the_catalog_gives_the_same_result(data, storage):
    x, q = data
    whole = TorchSearch(x, storage=storage).search(q, 20)
    chunked = TorchSearch(x, storage=storage, chunk_size=700, query_batch=50).search(q, 20)
    np.testing.assert_allclose(chunked[0], whole[0], atol=1e-6)
    check_ref_knn_with_draws(whole[0], whole[1], chunked[0], chunked[1], 20)


@pytest.mark.parametrize("metric, pad", [("ip", -FLT_MAX), ("l2", FLT_MAX)])
def test_k_above_the_catalog_pads_like_faiss(data, metric, pad):
    x, q = data
    scores, positions = TorchSearch(x[:7], metric=metric, storage="bf16").search(q[:3], 10)
    ref = _exact(x[:7], q[:3], 10, metric)
    assert (positions[:, 7:] == -1).all() and (scores[:, 7:] == pad).all()
    assert (ref[1][:, 7:] == -1).all() and (np.sort(positions[:, :7], 1) == np.arange(7)).all()
    np.testing.assert_allclose(scores[:, :7], ref[0][:, :7], atol=2e-5)


def test_empty_batch_and_tensor_queries(data):
    x, q = data
    search = TorchSearch(x, storage="bf16")
    scores, positions = search.search(q[:0], 5)
    assert scores.shape == positions.shape == (0, 5)
    as_array = search.search(q, 5)
    as_tensor = search.search(torch.from_numpy(q), 5)
    np.testing.assert_array_equal(as_tensor[1], as_array[1])


def test_bad_arguments_are_named():
    x = _clustered(10)
    with pytest.raises(ConfigError, match=r"storage must be one of \('fp32', 'fp16', 'bf16', 'int8'\); got 'fp8'"):
        TorchSearch(x, storage="fp8")
    with pytest.raises(ConfigError, match="chunk_size must be an int >= 1; got 0"):
        TorchSearch(x, chunk_size=0)
    with pytest.raises(DataError, match="non-empty 2-d array"):
        TorchSearch(x[:0])
    with pytest.raises(DataError, match=f"dimension {D}; the queries have shape \\(2, 3\\)"):
        TorchSearch(x).search(x[:2, :3], 1)


@pytest.mark.parametrize("host_storage", [False, True])
@pytest.mark.parametrize("nprobe", [1, 4, 32])
def test_ivf_partition_from_faiss_matches_faiss_ivf(data, nprobe, host_storage):
    x, q = data
    index = FaissIndex.build(x, pa.array(np.arange(len(x))), factory="IVF32,Flat", normalize=False)
    ref = index.search(q, 30, nprobe=nprobe)
    on_torch = index.to_torch("cpu", storage="bf16", chunk_size=500, host_storage=host_storage)
    assert on_torch.backend == "torch-cpu" and on_torch._torch.nlist == 32
    got = on_torch.search(q, 30, nprobe=nprobe)
    assert ((got[1] == -1) == (ref[1] == -1)).all()
    check_ref_knn_with_draws(ref[0], ref[1], got[0], got[1], 30)


def test_torch_kmeans_partition_probing_every_list_is_exact(data):
    x, q = data
    lists, centroids = kmeans(x, 16, iters=5)
    assert lists.shape == (len(x),) and centroids.shape == (16, D) and len(np.unique(lists)) > 8
    search = TorchSearch(x, lists=lists, centroids=centroids, storage="bf16")
    ref = _exact(x, q, 10, "ip")
    full = search.search(q, 10, nprobe=16)
    check_ref_knn_with_draws(ref[0], ref[1], full[0], full[1], 10)
    assert _recall(ref[1], search.search(q, 10, nprobe=4)[1]) > 0.8


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF16,SQ8"])
def test_faiss_index_to_torch_agrees_with_the_faiss_index(data, factory):
    x, q = data
    index = FaissIndex.build(x, pa.array([f"i{i}" for i in range(len(x))]), factory=factory)
    exact = factory != "IVF16,SQ8"  # torch searches the decoded SQ8 vectors, as faiss does
    nprobe = 16 if factory.startswith("IVF") else None
    ref = index.search(q, 20, nprobe=nprobe) if exact or nprobe else None
    got = index.to_torch("cpu", storage="int8").search(q, 20, nprobe=nprobe)
    if factory == "HNSW16":  # torch is exact; the graph is approximate
        ref = _exact(x, q, 20, "ip")
    check_ref_knn_with_draws(ref[0], ref[1], got[0], got[1], 20)
    np.testing.assert_allclose(got[0], ref[0], atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("storage", ["fp16", "bf16", "int8"])
def test_cuda_search_matches_exact_cpu_search(data, storage):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x, q = data
    ref = _exact(x, q, 100, "ip")
    got = TorchSearch(x, device="cuda", storage=storage, chunk_size=1000).search(torch.from_numpy(q).cuda(), 100)
    check_ref_knn_with_draws(ref[0], ref[1], got[0], got[1], 100)
    np.testing.assert_allclose(got[0], ref[0], atol=2e-5)
