import numpy as np
import pyarrow as pa
import pytest

from indexes import FaissIndex
from pipeline.errors import ArtifactError, ConfigError, DataError, DeviceError, SchemaError
from pipeline.stage import Pipeline
from stages.faiss import FaissRecall

N, D = 2000, 32


def clustered(n, d=D, clusters=20, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d))
    points = centers[rng.integers(clusters, size=n)] + 0.3 * rng.standard_normal((n, d))
    return points.astype(np.float32)


def queries(q, ids=None, fixed=True):
    values = pa.array(q.ravel(), pa.float32())
    if fixed:
        emb = pa.FixedSizeListArray.from_arrays(values, q.shape[1])
    else:
        emb = pa.ListArray.from_arrays(pa.array(np.arange(0, q.size + 1, q.shape[1]), pa.int32()), values)
    ids = ids if ids is not None else [f"q{i}" for i in range(len(q))]
    return pa.table({"query_id": ids, "segment": [i % 2 for i in range(len(q))], "query_embedding": emb})


@pytest.fixture(scope="module")
def items():
    return clustered(N)


@pytest.fixture(scope="module")
def flat_dir(tmp_path_factory, items):
    folder = tmp_path_factory.mktemp("flat")
    FaissIndex.build(items, pa.array([f"sku{i}" for i in range(N)]), encoder="enc").save(folder)
    return folder


@pytest.fixture(scope="module")
def ivf_dir(tmp_path_factory, items):
    folder = tmp_path_factory.mktemp("ivf")
    FaissIndex.build(items, pa.array(np.arange(N)), factory="IVF16,Flat").save(folder)
    return folder


def test_long_form_output(flat_dir):
    q = clustered(4, seed=1)
    stage = FaissRecall(index=str(flat_dir), k=5, device="cpu")
    out = stage(queries(q))
    assert out.column_names == ["query_id", "segment", "item_id", "score", "rank", "source"]
    assert out.schema.field("score").type == pa.float32()
    assert out.schema.field("rank").type == pa.int32()
    assert out.schema.field("item_id").type == pa.string()
    assert out.column("query_id").to_pylist() == [f"q{i}" for i in range(4) for _ in range(5)]
    assert out.column("segment").to_pylist() == [i % 2 for i in range(4) for _ in range(5)]
    assert out.column("rank").to_pylist() == [1, 2, 3, 4, 5] * 4
    assert set(out.column("source").to_pylist()) == {"dense"}
    scores, positions = FaissIndex.load(flat_dir).search(q, 5)
    assert out.column("item_id").to_pylist() == [f"sku{p}" for p in positions.ravel()]
    np.testing.assert_array_equal(out.column("score").to_numpy(), scores.ravel())


def test_list_and_fixed_embeddings_agree(flat_dir):
    q = clustered(3, seed=2)
    stage = FaissRecall(index=str(flat_dir), k=7, device="cpu", source="ann")
    fixed = stage(queries(q))
    assert stage(queries(q, fixed=False)).equals(fixed)
    sliced = queries(clustered(6, seed=2)).slice(3)
    assert stage(sliced).num_rows == 21


def test_relative_index_path_and_params(flat_dir):
    stage = FaissRecall(index=flat_dir.name, k=3, device="cpu")
    stage._base_dir = flat_dir.parent
    assert stage(queries(clustered(2, seed=3))).num_rows == 6
    assert stage.get_params()["index"] == flat_dir.name
    assert stage.clone(k=4).get_params()["k"] == 4


def test_k_above_index_size_is_short(tmp_path, items):
    FaissIndex.build(items[:50], pa.array(np.arange(50)), encoder="enc").save(tmp_path)
    q = queries(clustered(2, seed=4))
    out = FaissRecall(index=str(tmp_path), k=100, device="cpu")(q)
    assert out.num_rows == 100 and out.column("rank").to_pylist() == list(range(1, 51)) * 2
    with pytest.raises(DataError, match="query 'q0' got 50 hits but k=100"):
        FaissRecall(index=str(tmp_path), k=100, on_short="error", device="cpu")(q)


def test_ivf_small_nprobe_short_lists(ivf_dir):
    q = queries(clustered(5, seed=5))
    out = FaissRecall(index=str(ivf_dir), k=1000, nprobe=1, device="cpu")(q)
    counts = out.group_by("query_id").aggregate([("rank", "max"), ("rank", "count")])
    assert (counts.column("rank_max").to_numpy() == counts.column("rank_count").to_numpy()).all()
    assert out.num_rows < 5000
    with pytest.raises(DataError, match=r"query 'q\d' got \d+ hits but k=1000"):
        FaissRecall(index=str(ivf_dir), k=1000, nprobe=1, on_short="error", device="cpu")(q)
    full = FaissRecall(index=str(ivf_dir), k=1000, nprobe=16, on_short="error", device="cpu")(q)
    assert full.num_rows == 5000 and full.schema.field("item_id").type == pa.int64()


def test_l2_scores_are_higher_is_better(tmp_path, items):
    FaissIndex.build(items, pa.array(np.arange(N)), metric="l2", normalize=False).save(tmp_path)
    out = FaissRecall(index=str(tmp_path), k=10, device="cpu")(queries(clustered(2, seed=6)))
    scores = out.column("score").to_numpy().reshape(2, 10)
    assert (scores <= 0).all() and (np.diff(scores, axis=1) <= 0).all()


def test_missing_column(flat_dir):
    table = queries(clustered(2, seed=7)).drop_columns(["query_embedding"])
    with pytest.raises(SchemaError, match="stage 'recall.faiss' needs column 'query_embedding'"):
        FaissRecall(index=str(flat_dir), device="cpu")(table)
    with pytest.raises(SchemaError, match="stage 'recall.faiss' needs column 'emb'"):
        Pipeline([FaissRecall(index=str(flat_dir), embedding_column="emb")], inputs=queries(clustered(1)).schema)


def test_custom_embedding_column(flat_dir):
    table = queries(clustered(2, seed=8)).rename_columns(["query_id", "segment", "emb"])
    stage = FaissRecall(index=str(flat_dir), k=2, embedding_column="emb", device="cpu")
    pipe = Pipeline([stage], inputs=table.schema)
    assert "emb" not in pipe.output_schema.names
    assert pipe(table).column_names == ["query_id", "segment", "item_id", "score", "rank", "source"]


def test_wrong_dimension(flat_dir):
    with pytest.raises(DataError, match=f"stage 'recall.faiss': column 'query_embedding' has dimension 8 but the index at .* has {D}"):
        FaissRecall(index=str(flat_dir), device="cpu")(queries(clustered(2, d=8)))
    ragged = queries(clustered(2, seed=9), fixed=False)
    values = ragged.column("query_embedding").combine_chunks()
    short = pa.ListArray.from_arrays(pa.array([0, D, 2 * D - 1], pa.int32()), values.values.slice(0, 2 * D - 1))
    with pytest.raises(DataError, match=f"has dimension {D - 1}"):
        FaissRecall(index=str(flat_dir), device="cpu")(ragged.set_column(2, "query_embedding", short))


def test_empty_batch(flat_dir):
    table = queries(clustered(3, seed=10)).slice(0, 0)
    out = FaissRecall(index=str(flat_dir), k=5, device="cpu")(table)
    assert out.num_rows == 0
    assert out.schema.names == ["query_id", "segment", "item_id", "score", "rank", "source"]
    assert [out.schema.field(c).type for c in ("item_id", "score", "rank", "source")] == [
        pa.string(), pa.float32(), pa.int32(), pa.string()
    ]


@pytest.mark.parametrize(
    "params, param",
    [({"k": 0}, "k"), ({"k": "5"}, "k"), ({"k": True}, "k"), ({"on_short": "drop"}, "on_short"),
     ({"nprobe": 0}, "nprobe"), ({"ef_search": 2.5}, "ef_search"), ({"device": "tpu"}, "device")],
)
def test_bad_params(params, param):
    with pytest.raises(ConfigError, match=f"the '{param}' parameter of stage 'recall.faiss' must be"):
        FaissRecall(**params).validate_params()


def test_missing_index_leaves_stage_cold(tmp_path):
    stage = FaissRecall(index=str(tmp_path / "none"), device="cpu")
    with pytest.raises(ArtifactError, match="not found"):
        stage.warm_up()
    assert not stage.is_warm


def test_cuda_without_gpu(flat_dir):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(DeviceError):
        FaissRecall(index=str(flat_dir), device="cuda").warm_up()
    stage = FaissRecall(index=str(flat_dir), device="auto")
    stage.warm_up()
    assert stage.device_ == "cpu"


@pytest.mark.gpu
def test_cuda_matches_cpu(ivf_dir):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    q = queries(clustered(4, seed=11))
    cpu = FaissRecall(index=str(ivf_dir), k=10, nprobe=16, device="cpu")(q)
    stage = FaissRecall(index=str(ivf_dir), k=10, nprobe=16, device="auto")
    gpu = stage(q)
    assert stage.device_ in ("cpu", "cuda")
    assert gpu.column("item_id").equals(cpu.column("item_id"))


@pytest.mark.parametrize("storage", ["auto", "bf16", "int8"])
@pytest.mark.parametrize("index_dir, nprobe", [("flat_dir", None), ("ivf_dir", 4)])
def test_torch_search_backend_returns_the_faiss_table(request, index_dir, nprobe, storage):
    """The torch search that recall uses on a GPU without faiss-gpu, forced onto the CPU."""
    from pipeline.testing import assert_parity

    folder = request.getfixturevalue(index_dir)
    q = queries(clustered(30, seed=5))
    ref = FaissRecall(index=str(folder), k=25, nprobe=nprobe, device="cpu")(q)
    stage = FaissRecall(index=str(folder), k=25, nprobe=nprobe, device="cpu", search_backend="torch",
                        search_storage=storage)
    got = stage(q)
    assert stage.index_.backend == "torch-cpu"
    assert got.column_names == ref.column_names and got.schema == ref.schema
    assert_parity(ref, got, atol=1e-5)
    assert got.column("rank").equals(ref.column("rank"))


def test_search_params_are_checked_and_round_trip(flat_dir):
    stage = FaissRecall(index=str(flat_dir), search_backend="torch", search_storage="int8")
    assert stage.clone().get_params()["search_storage"] == "int8"
    with pytest.raises(ConfigError, match=r"'search_backend' .* one of \('auto', 'faiss', 'torch'\)"):
        FaissRecall(index=str(flat_dir), search_backend="cupy").warm_up()
    with pytest.raises(ConfigError, match="'search_storage'.*'fp8'"):
        FaissRecall(index=str(flat_dir), search_storage="fp8").warm_up()
