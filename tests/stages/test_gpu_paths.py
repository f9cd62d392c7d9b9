"""The CUDA paths' CPU-side logic: fall-back decisions and their log lines, the faiss wheel check,
device tensors through faiss's pointer API, hummingbird-ml's torch trees against LightGBM (on
the CPU, where both run), Polars' GPU engine fall-back, MMR, and LightGBM's OpenCL trainer.

What needs a CUDA device is in test_gpu_parity.py (marked ``gpu``).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil

import lightgbm as lgb
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch

from indexes.faiss_index import (GPU_MAX_K, FaissIndex, check_faiss_distributions, faiss_has_gpu,
                                 gpu_search_fallback, installed_faiss_distributions)
from pipeline.errors import ConfigError, DeviceError
from pipeline.registry import available_stages, get_stage_class
from pipeline.testing import CHECKS, StageCase, assert_parity, assert_tables_close
from stages.gpu_util import (TorchTreeModel, collect, index_on_device, log_fallback, search_plan,
                             tree_model_unsupported)
from stages.lightgbm import LightGBMRanker
from stages.mmr import MMRDisplay, mmr_select
from stages.rules import RuleFilter

#: every registered stage with a CUDA path, and where its CPU/GPU parity is tested (gpu-marked)
PARITY_TESTS = {
    "encode.sentence_transformers": "tests/stages/test_gpu_parity.py, tests/stages/test_builtin_conformance.py",
    "recall.faiss": "tests/stages/test_gpu_parity.py, tests/stages/test_builtin_conformance.py",
    "filter.rules": "tests/stages/test_gpu_parity.py, tests/stages/test_builtin_conformance.py",
    "rank.lightgbm": "tests/stages/test_gpu_parity.py, tests/stages/test_builtin_conformance.py",
    "display.mmr": "tests/stages/test_gpu_parity.py",
    "recall.fused": "tests/stages/test_gpu_parity.py",
    "recall.user_vector": "tests/stages/test_gpu_parity.py",
    "recall.sequence": "tests/stages/test_sequence.py",
    "features.sequence": "tests/stages/test_sequence.py",
    "rerank.cross_encoder": "tests/stages/test_cross_encoder.py (the conformance kit's cpu_gpu_parity)",
    "features.price_band": "examples/plugin/tests (parametrize_with_checks includes cpu_gpu_parity)",
}


def test_every_stage_with_a_cuda_path_has_a_parity_test():
    cuda = {key for key in available_stages() if "cuda" in get_stage_class(key).tags.devices}
    missing = sorted(cuda - set(PARITY_TESTS))
    assert not missing, (f"stages {missing} declare a CUDA path but no CPU/GPU parity test; add a case to "
                         "tests/stages/test_gpu_parity.py and list it in PARITY_TESTS")


# -- faiss: one wheel ------------------------------------------------------------------------


def test_two_faiss_wheels_are_refused_with_the_repair():
    check_faiss_distributions(["faiss-cpu", "numpy"])
    check_faiss_distributions(["faiss-gpu-cu12"])
    with pytest.raises(DeviceError, match=r"faiss-cpu and faiss-gpu-cu12 are all installed.*"
                                          r"pip uninstall -y faiss-cpu faiss-gpu-cu12.*funnel-rank\[gpu\]"):
        check_faiss_distributions(["faiss-gpu-cu12", "faiss-cpu"])
    with pytest.raises(DeviceError, match="faiss-gpu-cu12 and faiss-gpu-cu12-cuvs"):
        check_faiss_distributions(["faiss-gpu-cu12", "faiss-gpu-cu12-cuvs"])


def test_installed_faiss_wheels_are_read_from_metadata_folders(tmp_path):
    for name in ("faiss_cpu-1.15.1.dist-info", "faiss_gpu_cu12-1.14.1.post1.dist-info", "faissy.txt",
                 "numpy-2.0.dist-info"):
        (tmp_path / name).mkdir()
    assert installed_faiss_distributions([str(tmp_path)]) == ["faiss-cpu", "faiss-gpu-cu12"]
    assert len([n for n in installed_faiss_distributions() if n.startswith(("faiss-cpu", "faiss-gpu"))]) == 1


# -- faiss: GPU limits -----------------------------------------------------------------------


def test_gpu_search_fallback_decisions():
    assert gpu_search_fallback(GPU_MAX_K) is None
    assert "k=2049 exceeds faiss-gpu's limit of 2048" in gpu_search_fallback(2049)
    assert gpu_search_fallback(100, nprobe=2048, gpu_kind="ivf") is None
    assert "nprobe=4096 exceeds" in gpu_search_fallback(100, nprobe=4096, gpu_kind="ivf")
    reason = gpu_search_fallback(10, ef_search=64, gpu_kind="ivf")
    assert "ef_search=64 tunes an HNSW graph that the GPU copy (ivf)" in reason
    assert gpu_search_fallback(10, ef_search=64, gpu_kind="hnsw") is None
    assert gpu_search_fallback(10, ef_search=64, gpu_kind="cagra") is None
    assert gpu_search_fallback(600, max_k=512) is not None


def _vectors(n=3000, d=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _as_if_on_gpu(index: FaissIndex, kind: str) -> FaissIndex:
    """Mark a CPU index as cloned to the GPU, to drive the placement logic without CUDA.

    Its "GPU copy" is a second CPU copy, so only the decision and the log line are under test
    here; test_gpu_parity.py runs the real clone.
    """
    import faiss

    index._index, index._gpu_resources = faiss.clone_index(index._cpu_index), "simulated"
    index._gpu_device, index._gpu_kind = 0, kind
    return index


def test_search_beyond_gpu_limits_runs_on_the_cpu_index_and_logs_once(caplog):
    x = _vectors()
    plain = FaissIndex.build(x, pa.array(np.arange(len(x))), factory="Flat")
    index = _as_if_on_gpu(FaissIndex.build(x, pa.array(np.arange(len(x))), factory="Flat"), "flat")
    with caplog.at_level(logging.WARNING, logger="indexes.faiss_index"):
        got = index.search(x[:3], 2100)
        index.search(x[3:6], 2100)
        index.search(x[:3], 10)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "searching on the CPU instead of the GPU: k=2100 exceeds faiss-gpu's limit of 2048" in warnings[0]
    want = plain.search(x[:3], 2100)
    np.testing.assert_array_equal(got[1], want[1])
    assert index._placement(2100, None, None)[0] is index._cpu_index
    assert index._placement(10, None, None)[0] is index._index is not index._cpu_index


def test_gpu_search_parameters_per_index_kind():
    x = _vectors(2000)
    ivf = _as_if_on_gpu(FaissIndex.build(x, pa.array(np.arange(2000)), factory="IVF16,Flat"), "ivf")
    assert ivf._gpu_params(10, 8, None).nprobe == 8
    assert ivf._gpu_params(10, None, None) is None
    if hasattr(__import__("faiss"), "SearchParametersCagra"):
        cagra = _as_if_on_gpu(FaissIndex.build(x, pa.array(np.arange(2000)), factory="Flat"), "cagra")
        assert cagra._gpu_params(200, None, None).itopk_size == 200
        assert cagra._gpu_params(10, None, 96).itopk_size == 96


def test_cagra_needs_faiss_with_cuvs():
    if hasattr(__import__("faiss"), "GpuIndexCagra"):
        pytest.skip("this faiss has CAGRA; test_gpu_parity.py builds one")
    with pytest.raises(ConfigError, match=r"needs faiss built with cuVS \(faiss-gpu-cuvs\)"):
        FaissIndex.build(_vectors(100), pa.array(np.arange(100)), factory="CAGRA32")
    with pytest.raises(ConfigError, match="'CAGRA' or 'CAGRA<graph degree>'"):
        FaissIndex.build(_vectors(100), pa.array(np.arange(100)), factory="CAGRAx")


@pytest.mark.parametrize("factory, metric, nprobe", [("Flat", "ip", None), ("IVF16,Flat", "ip", 4), ("Flat", "l2", None)])
def test_torch_tensor_queries_match_numpy_queries(factory, metric, nprobe):
    x, q = _vectors(2000), _vectors(20, seed=1)
    index = FaissIndex.build(x, pa.array(np.arange(2000)), factory=factory, metric=metric)
    want_scores, want_pos = index.search(q, 15, nprobe=nprobe)
    got_scores, got_pos = index.search(torch.from_numpy(q), 15, nprobe=nprobe)
    np.testing.assert_array_equal(got_pos, want_pos)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-5)
    assert got_scores.dtype == np.float32 and got_pos.dtype == np.int64


def test_item_vectors_read_back_by_id():
    x = _vectors(500)
    ids = pa.array([f"i{i}" for i in range(500)])
    for factory in ("Flat", "IVF8,Flat", "HNSW16"):
        index = FaissIndex.build(x, ids, factory=factory)
        pos = index.positions_for(pa.array(["i3", "nope", "i499"]))
        assert pos.tolist() == [3, -1, 499]
        vec = index.vectors(pos)
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        np.testing.assert_allclose(vec[[0, 2]], unit[[3, 499]], atol=1e-6)
        assert not vec[1].any()
    numeric = FaissIndex.build(x, pa.array(np.arange(500, dtype=np.int64)))
    assert numeric.positions_for(pa.array([7, 9], pa.int32())).tolist() == [7, 9]


@pytest.mark.parametrize("device, backend, faiss_gpu, plan", [
    ("cpu", "auto", False, "faiss"), ("cpu", "auto", True, "faiss"), ("cpu", "faiss", True, "faiss"),
    ("cpu", "torch", False, "torch"), ("cuda", "auto", True, "faiss-gpu"), ("cuda", "auto", False, "torch"),
    ("cuda", "faiss", False, "faiss-gpu"), ("cuda", "torch", True, "torch"),
])
def test_search_plan(device, backend, faiss_gpu, plan):
    assert search_plan(device, backend, faiss_gpu) == plan


@pytest.mark.skipif(faiss_has_gpu(), reason="checks the path where faiss cannot move an index to a GPU")
def test_index_on_device_falls_back_only_when_allowed(caplog):
    from stages.faiss import FaissRecall

    index = FaissIndex.build(_vectors(50), pa.array(np.arange(50, dtype=np.int64)))
    stage = FaissRecall(device="auto", search_backend="faiss")
    stage.device_ = "cuda"  # as if CUDA were visible: faiss-cpu still cannot move the index
    with caplog.at_level(logging.WARNING, logger="stages.gpu_util"):
        assert index_on_device(stage, index) is index
    assert stage.device_ == "cpu" and "searching on the CPU" in caplog.text
    explicit = FaissRecall(device="cuda", search_backend="faiss")
    explicit.device_ = "cuda"
    with pytest.raises(DeviceError, match="without GPU support"):
        index_on_device(explicit, index)
    cpu = FaissRecall(device="cpu")
    cpu.device_ = "cpu"
    assert index_on_device(cpu, index) is index


@pytest.mark.skipif(faiss_has_gpu(), reason="checks the path where faiss has no GPU support")
@pytest.mark.parametrize("requested", ["cuda", "auto"])
def test_cuda_with_faiss_cpu_searches_with_torch(monkeypatch, tmp_path, requested):
    """``device="cuda"`` with faiss-cpu (CUDA 13: no faiss GPU wheel) never fails: torch searches.

    No CUDA device here, so the stage resolves to CUDA by a patched device check, and the torch
    index it asks for on "cuda" is made on the CPU — the wiring is what is tested; the real CUDA
    run is test_gpu_parity.py::test_recall_on_cuda_with_faiss_cpu_uses_torch.
    """
    import stages.faiss as faiss_stage
    from pipeline import device as device_module

    monkeypatch.setattr(device_module, "cuda_available", lambda: True)
    asked = []
    to_torch = FaissIndex.to_torch

    def on_cpu(self, device="cuda", **kw):
        asked.append((device, kw["storage"]))
        return to_torch(self, "cpu", **kw)

    monkeypatch.setattr(FaissIndex, "to_torch", on_cpu)
    x = _vectors(300)
    folder = tmp_path / "index"
    FaissIndex.build(x, pa.array([f"i{i}" for i in range(len(x))])).save(folder)
    stage = faiss_stage.FaissRecall(index=str(folder), k=10, device=requested)
    table = pa.table({"query_id": ["a", "b"], "query_embedding": pa.array(x[:2].tolist(), pa.list_(pa.float32()))})
    out = stage(table)
    assert stage.device_ == "cuda" and stage.index_.backend == "torch-cpu" and asked == [("cuda", "fp16")]
    ref = faiss_stage.FaissRecall(index=str(folder), k=10, device="cpu")(table)
    assert_parity(ref, out, atol=1e-5)


# -- logging helper and Polars' GPU engine ---------------------------------------------------


def test_log_fallback_once_per_owner_and_reason(caplog):
    class Owner:
        pass

    a, b = Owner(), Owner()
    with caplog.at_level(logging.WARNING, logger="stages.gpu_util"):
        for owner in (a, a, b):
            log_fallback(owner, "reason one")
        log_fallback(a, "reason two")
    assert [r.getMessage() for r in caplog.records] == ["reason one", "reason one", "reason two"]


def test_polars_gpu_engine_falls_back_to_the_cpu_engine(caplog):
    lazy = pl.LazyFrame({"a": [3, 1, 2], "b": ["x", "y", "z"]}).filter(pl.col("a") > 1).sort("a")
    owner = type("Owner", (), {})()
    with caplog.at_level(logging.WARNING, logger="stages.gpu_util"):
        out = collect(lazy, device="cuda", owner=owner, what="test")
    assert out.equals(lazy.collect())
    try:
        import cudf_polars  # noqa: F401
    except ImportError:
        assert "Polars' GPU engine cannot run this query" in caplog.text and "cudf_polars" in caplog.text
    assert collect(lazy, device="cpu", owner=owner, what="test").equals(lazy.collect())


def test_rule_filter_device_parameter_and_gpu_path_fallback(demo_pipeline, stage_inputs, caplog):
    step = [s.name for s in demo_pipeline].index("filter.rules")
    cpu_stage = demo_pipeline.stages[step]
    assert cpu_stage.device == "cpu" and "cuda" in RuleFilter.tags.devices
    with pytest.raises(ConfigError, match="'device' parameter of stage 'filter.rules'"):
        RuleFilter(device="tpu").validate_params()
    rules = cpu_stage.get_params()["rules"]
    stage = RuleFilter(rules=rules, dedupe_by="brand", device="cpu")
    want = stage(stage_inputs[step])
    gpu_path = RuleFilter(rules=rules, dedupe_by="brand", device="cpu")
    gpu_path.warm_up()
    gpu_path.device_ = "cuda"  # the CUDA code path, on a machine whose GPU engine is missing
    with caplog.at_level(logging.WARNING, logger="stages.gpu_util"):
        got = gpu_path(stage_inputs[step])
    assert_tables_close(got, want, rtol=0, atol=0)
    if not caplog.records:
        pytest.skip("cudf-polars is installed and ran the rules")
    assert "stage 'filter.rules': Polars' GPU engine cannot run this query" in caplog.text


# -- LightGBM on torch (hummingbird-ml) ------------------------------------------------------

needs_hummingbird = pytest.mark.skipif(importlib.util.find_spec("hummingbird") is None,
                                       reason="hummingbird-ml is not installed (it is in the dev and gpu extras)")


def _ranking_data(n_queries=60, per_query=30, d=6, seed=0, nan_fraction=0.0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_queries * per_query, d)).astype(np.float32)
    X[:, 2] = rng.integers(0, 4, len(X))
    y = np.clip(np.rint(X[:, 0] + (X[:, 2] == 1) * 1.5 + rng.standard_normal(len(X)) * 0.5 + 1), 0, 3).astype(int)
    if nan_fraction:
        X[rng.random(X.shape) < nan_fraction] = np.nan
    return X, y, [per_query] * n_queries


def _train(params=None, nan_fraction=0.0, **kw):
    X, y, groups = _ranking_data(nan_fraction=nan_fraction)
    data = lgb.Dataset(X, y, group=groups, **kw)
    booster = lgb.train({"objective": "lambdarank", "verbose": -1, "num_leaves": 15, "seed": 0, "num_threads": 1,
                         **(params or {})},
                        data, num_boost_round=40)
    return lgb.Booster(model_str=booster.model_to_string()), X


def _threshold_probes(booster, X):
    """Rows whose features sit exactly on, just above and just below every split threshold."""
    rng = np.random.default_rng(1)
    rows = []
    for tree in booster.dump_model()["tree_info"]:
        stack = [tree["tree_structure"]]
        while stack:
            node = stack.pop()
            if "split_feature" not in node:
                continue
            t = np.float32(node["threshold"])
            for v in (t, np.nextafter(t, np.float32(np.inf)), np.nextafter(t, np.float32(-np.inf))):
                row = X[rng.integers(len(X))].copy()
                row[node["split_feature"]] = v
                rows.append(row)
            stack.extend((node["left_child"], node["right_child"]))
    return np.array(rows, np.float32)


@needs_hummingbird
def test_torch_trees_score_exactly_like_lightgbm_on_cpu():
    booster, X = _train()
    trees = TorchTreeModel(booster, "cpu")
    near_zero = []
    for value in (np.float32(1e-35), -np.float32(1e-35), np.float32(1e-36), -np.float32(1e-36), np.float32(2e-35)):
        for feature in range(X.shape[1]):
            rows = X[:40].copy()
            rows[:, feature] = value
            near_zero.append(rows)
    special = [[1e-36, -1e-35, 0, np.inf, -np.inf, 0.5]]
    probes = np.vstack([X, _threshold_probes(booster, X), *near_zero, special]).astype(np.float32)
    np.testing.assert_allclose(trees.predict(probes), booster.predict(probes), rtol=0, atol=1e-9)
    with_nan = probes[:50].copy()
    with_nan[::3, 1] = np.nan
    assert trees.nan_to_zero
    np.testing.assert_allclose(trees.predict(with_nan), booster.predict(with_nan), rtol=0, atol=1e-9)


@needs_hummingbird
def test_nan_aware_models_send_nan_batches_back_to_lightgbm():
    booster, X = _train(nan_fraction=0.1)
    trees = TorchTreeModel(booster, "cpu")
    assert not trees.nan_to_zero
    clean = np.nan_to_num(X[:200], nan=0.25)
    np.testing.assert_allclose(trees.predict(clean), booster.predict(clean), rtol=0, atol=1e-9)
    assert trees.predict(X[:200]) is None


@needs_hummingbird
def test_models_torch_trees_cannot_reproduce_are_named():
    assert tree_model_unsupported(_train()[0]) is None
    assert "categorical" in tree_model_unsupported(_train(categorical_feature=[2])[0])
    assert "zero as missing" in tree_model_unsupported(_train({"zero_as_missing": True}, nan_fraction=0.1)[0])
    assert "linear trees" in tree_model_unsupported(_train({"objective": "regression", "linear_tree": True})[0])
    X, y, _ = _ranking_data()
    binary = lgb.train({"objective": "binary", "verbose": -1, "num_threads": 1}, lgb.Dataset(X, (y > 1).astype(int)), num_boost_round=3)
    assert "objective 'binary' transforms the raw score" in tree_model_unsupported(binary)
    with pytest.raises(DeviceError, match="cannot score this LightGBM model exactly: objective 'binary'"):
        TorchTreeModel(binary, "cpu")


@needs_hummingbird
def test_ranker_gpu_path_equals_lightgbm_and_falls_back_on_nan(demo_pipeline, stage_inputs, caplog):
    step = [s.name for s in demo_pipeline].index("rank.lightgbm")
    ranker, table = demo_pipeline.stages[step], stage_inputs[step]
    want = ranker.clone(device="cpu")(table)
    gpu_path = ranker.clone(device="cpu")
    gpu_path.warm_up()
    assert gpu_path.trees_ is None
    gpu_path.trees_ = TorchTreeModel(gpu_path.booster_, "cpu")  # what warm_up() builds on "cuda", placed on the CPU
    assert_tables_close(gpu_path(table), want, rtol=0, atol=1e-6)

    feature = gpu_path.features_[0]
    holes = table.set_column(table.schema.get_field_index(feature), table.schema.field(feature),
                             pa.array([None] + table.column(feature).to_pylist()[1:], table.schema.field(feature).type))
    if not gpu_path.trees_.nan_to_zero:
        with caplog.at_level(logging.WARNING, logger="stages.gpu_util"):
            out = gpu_path(holes)
        assert "a batch has NaN features" in caplog.text
    else:
        out = gpu_path(holes)
    assert_tables_close(out, ranker.clone(device="cpu")(holes), rtol=0, atol=1e-6)


def test_ranker_train_device_parameter(demo_shop, tmp_path):
    with pytest.raises(ConfigError, match="'train_device' parameter of stage 'rank.lightgbm' must be one of"):
        LightGBMRanker(train_device="tpu").validate_params()
    with pytest.raises(DeviceError, match="train_device='cuda'.*CUDA Tree Learner was not enabled.*built with CUDA"):
        _build_ranker(demo_shop, tmp_path, train_device="cuda")


def _build_ranker(demo_shop, tmp_path, **params):
    from pipeline.build import build_artifacts
    from pipeline.config import load_config

    root = tmp_path / "shop"
    shutil.copytree(demo_shop / "data", root / "data")
    shutil.copytree(demo_shop / "artifacts", root / "artifacts", ignore=shutil.ignore_patterns("ranker"))
    cfg = load_config(demo_shop / "pipeline.toml")
    for spec in cfg.stages:
        if spec["type"] == "rank.lightgbm":
            spec["params"].update(n_estimators=15, **params)
    cfg.save(root / "pipeline.toml")
    messages = []
    build_artifacts(load_config(root / "pipeline.toml"), progress=False, log=messages.append,
                    only=lambda s: s.name == "rank.lightgbm")
    return root, messages


def _opencl_missing() -> str | None:
    """LightGBM's error when its OpenCL learner finds no device (one boosting round on 40 rows), else None."""
    rng = np.random.default_rng(0)
    data = lgb.Dataset(rng.random((40, 2)), label=rng.integers(0, 2, 40), group=[20, 20])
    try:
        lgb.train({"objective": "lambdarank", "device_type": "gpu", "verbose": -1}, data, num_boost_round=1)
    except lgb.basic.LightGBMError as exc:
        if "OpenCL" in str(exc):
            return str(exc)
    return None


@pytest.mark.slow
def test_ranker_trains_on_lightgbm_opencl_learner(request, tmp_path):
    """LightGBM's pip wheel has the OpenCL learner; pocl-opencl-icd runs it on a CPU (compiling its
    kernels takes about a minute the first time)."""
    no_device = _opencl_missing()
    if no_device:  # asked of LightGBM on 40 rows, before building the ranker's training candidates
        pytest.skip(f"no OpenCL device (apt-get install pocl-opencl-icd, or an NVIDIA driver): {no_device}")
    demo_shop = request.getfixturevalue("demo_shop")  # only once a device is known to be there
    try:
        root, messages = _build_ranker(demo_shop, tmp_path, train_device="gpu")
    except DeviceError as exc:
        if "No OpenCL device found" in str(exc) or "OpenCL" in str(exc.__cause__ or ""):
            pytest.skip(f"no OpenCL device (apt-get install pocl-opencl-icd, or an NVIDIA driver): {exc}")
        raise
    import json

    manifest = json.loads((root / "artifacts" / "ranker" / "manifest.json").read_text())
    assert manifest["params"]["device_type"] == "gpu" and manifest["best_iteration"] >= 1
    assert "trained on" in messages[-1]


# -- MMR -------------------------------------------------------------------------------------


def _mmr_reference(rel, emb, n, lam):
    """The textbook greedy loop, one query at a time."""
    chosen = []
    for _ in range(min(n, len(rel))):
        best, best_gain = None, -np.inf
        for i in range(len(rel)):
            if i in chosen:
                continue
            penalty = max((float(emb[i] @ emb[j]) for j in chosen), default=0.0)
            gain = lam * rel[i] - (1 - lam) * penalty
            if gain > best_gain:
                best, best_gain = i, gain
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.7, 1.0])
def test_mmr_select_matches_the_textbook_loop(lam):
    rng = np.random.default_rng(3)
    sizes = [12, 5, 1, 9]
    q, m, d = len(sizes), max(sizes), 8
    rel = torch.zeros(q, m, dtype=torch.float64)
    emb = torch.zeros(q, m, d, dtype=torch.float64)
    valid = torch.zeros(q, m, dtype=torch.bool)
    for i, size in enumerate(sizes):
        rel[i, :size] = torch.from_numpy(np.sort(rng.random(size))[::-1].copy())
        e = rng.standard_normal((size, d))
        emb[i, :size] = torch.from_numpy(e / np.linalg.norm(e, axis=1, keepdims=True))
        valid[i, :size] = True
    picks = mmr_select(rel, emb, valid, 6, lam)
    for i, size in enumerate(sizes):
        want = _mmr_reference(rel[i, :size].numpy(), emb[i, :size].numpy(), 6, lam)
        got = [p for p in picks[i].tolist() if p >= 0]
        assert got == want, f"query {i}"
    if lam == 1.0:
        assert picks[0].tolist() == list(range(6))


def _shop_candidates():
    """Two queries; q1's top items are three colours of one kettle (near-identical vectors)."""
    kettle, toaster, mug = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
    return pa.table({
        "query_id": ["q1"] * 5 + ["q2"] * 2,
        "item_id": ["k-red", "k-blue", "k-white", "toaster", "mug", "a", "b"],
        "score": pa.array([0.95, 0.94, 0.93, 0.80, 0.60, 0.5, 0.4], pa.float32()),
        "rank": pa.array([1, 2, 3, 4, 5, 1, 2], pa.int32()),
        "vec": pa.array([kettle, [0.99, 0.1, 0.0], [0.98, 0.0, 0.1], toaster, mug, None, toaster],
                        pa.list_(pa.float32())),
    })


def test_mmr_display_pushes_near_duplicates_down():
    table = _shop_candidates()
    out = MMRDisplay(n=3, mmr_lambda=0.5, embedding_column="vec", device="cpu")(table)
    q1 = [r["item_id"] for r in out.to_pylist() if r["query_id"] == "q1"]
    assert q1 == ["k-red", "toaster", "mug"]
    assert out.column("rank").to_pylist() == [1, 2, 3, 1, 2]
    plain = MMRDisplay(n=3, mmr_lambda=1.0, embedding_column="vec", device="cpu")(table)
    assert [r["item_id"] for r in plain.to_pylist()][:3] == ["k-red", "k-blue", "k-white"]
    assert out.schema == table.schema


def test_mmr_display_parameters():
    with pytest.raises(ConfigError, match="exactly one source of item vectors"):
        MMRDisplay().validate_params()
    with pytest.raises(ConfigError, match="exactly one source"):
        MMRDisplay(index="a", embedding_column="b").validate_params()
    with pytest.raises(ConfigError, match="'mmr_lambda' parameter of stage 'display.mmr' must be a number in"):
        MMRDisplay(mmr_lambda=1.5, embedding_column="v").validate_params()
    with pytest.raises(ConfigError, match="'candidates' parameter"):
        MMRDisplay(candidates=0, embedding_column="v").validate_params()


@pytest.mark.parametrize("check", [c for c in CHECKS if c != "cpu_gpu_parity"])
def test_mmr_display_conforms_on_the_demo_candidates(check, demo_shop, demo_pipeline, stage_inputs):
    stage = MMRDisplay(n=8, index=str(demo_shop / "artifacts" / "index"), device="cpu")
    CHECKS[check](StageCase(stage, stage_inputs[-1]))


def test_mmr_display_with_index_vectors_diversifies(demo_shop, stage_inputs):
    table = stage_inputs[-1]
    index = FaissIndex.load(demo_shop / "artifacts" / "index")
    stage = MMRDisplay(n=10, mmr_lambda=0.3, index=str(demo_shop / "artifacts" / "index"), device="cpu")
    plain = MMRDisplay(n=10, mmr_lambda=1.0, index=str(demo_shop / "artifacts" / "index"), device="cpu")

    def mean_pairwise_similarity(out):
        sims = []
        for q in set(out.column("query_id").to_pylist()):
            ids = pa.array([r["item_id"] for r in out.to_pylist() if r["query_id"] == q], table.schema.field("item_id").type)
            v = index.vectors(index.positions_for(ids))
            s = v @ v.T
            sims.append(s[np.triu_indices(len(v), 1)].mean())
        return float(np.mean(sims))

    assert mean_pairwise_similarity(stage(table)) < mean_pairwise_similarity(plain(table))


def test_faiss_has_gpu_matches_the_installed_wheel():
    assert faiss_has_gpu() == any(n.startswith("faiss-gpu") for n in installed_faiss_distributions())


# -- GPU only where it wins: the crossover of device="auto" ----------------------------------


@pytest.mark.parametrize("requested, rows, gpu", [("auto", 10, False), ("auto", 100, True), ("auto", 99, False),
                                                  ("cuda", 1, True), ("cpu", 1, True)])
def test_gpu_pays_off_from_the_crossover_on_auto_only(requested, rows, gpu):
    from stages.gpu_util import gpu_pays_off

    assert gpu_pays_off(requested, rows, 100) is gpu


@needs_hummingbird
def test_ranker_on_auto_scores_small_batches_with_lightgbm(demo_pipeline, stage_inputs, monkeypatch):
    import stages.lightgbm as lgbm_stage

    step = [s.name for s in demo_pipeline].index("rank.lightgbm")
    ranker, table = demo_pipeline.stages[step], stage_inputs[step]
    stage = ranker.clone(device="auto")
    stage.warm_up()
    calls = []

    class Spy:
        def predict(self, X):
            calls.append(len(X))
            return TorchTreeModel(stage.booster_, "cpu").predict(X)

    stage.trees_ = Spy()  # what warm_up() builds when "auto" resolves to CUDA
    want = ranker.clone(device="cpu")(table)
    assert_tables_close(stage(table), want, rtol=0, atol=1e-6)
    assert calls == []  # below RANKER_GPU_MIN_ROWS: LightGBM on the CPU
    monkeypatch.setattr(lgbm_stage, "RANKER_GPU_MIN_ROWS", table.num_rows)
    assert_tables_close(stage(table), want, rtol=0, atol=1e-6)
    assert calls == [table.num_rows]


def test_rule_filter_on_auto_collects_small_batches_on_the_cpu_engine(demo_pipeline, stage_inputs, monkeypatch):
    import stages.rules as rules_stage

    step = [s.name for s in demo_pipeline].index("filter.rules")
    rules = demo_pipeline.stages[step].get_params()["rules"]
    engines = []
    real = rules_stage.collect

    def spy(lazy, *, device, owner, what):
        engines.append(device)
        return real(lazy, device="cpu", owner=owner, what=what)

    monkeypatch.setattr(rules_stage, "collect", spy)
    stage = RuleFilter(rules=rules, device="auto")
    stage.warm_up()
    stage.device_ = "cuda"  # as if "auto" had found a GPU
    batch = stage_inputs[step]
    stage(batch)
    monkeypatch.setattr(rules_stage, "FILTER_GPU_MIN_ROWS", batch.num_rows)
    stage(batch)
    assert engines == ["cpu", "cuda"]


@pytest.mark.skipif(faiss_has_gpu(), reason="checks the path where faiss has no GPU support")
def test_hnsw_index_stays_on_the_cpu_unless_torch_is_asked_for(caplog):
    """Torch searches exactly; an HNSW graph on the CPU does not, so on "auto" the GPU would
    not give the CPU's hits (cpu_gpu_parity) and the graph is searched on the CPU, logged."""
    from stages.faiss import FaissRecall

    hnsw = FaissIndex.build(_vectors(400), pa.array(np.arange(400)), factory="HNSW16")
    assert not hnsw.torch_gives_same_hits and FaissIndex.build(_vectors(400), pa.array(np.arange(400))).torch_gives_same_hits
    stage = FaissRecall(device="cuda")
    stage.device_ = "cuda"  # as if CUDA were visible
    with caplog.at_level(logging.WARNING, logger="stages.gpu_util"):
        assert index_on_device(stage, hnsw) is hnsw
    assert stage.device_ == "cpu" and "would search the 'HNSW16' index exactly" in caplog.text
    forced = FaissRecall(device="cpu", search_backend="torch")
    forced.device_ = "cpu"
    assert index_on_device(forced, hnsw).backend == "torch-cpu"
