"""``funnel bench``: the report's contract on the demo shop (small sizes), and its tools on hand cases.

No test asserts a timing: timings are only checked to be present and positive.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from pipeline import ConfigError
from pipeline.bench import latency_summary, pareto_front, parse_override, stored_vectors, synthetic_vectors
from pipeline.bench import bare
from pipeline.bench.bare import BarePipeline, Unsupported
from pipeline.cli import main

REPO = Path(__file__).resolve().parents[2]

STAGE_KEYS = {"name", "device", "rows_in", "rows_out", "p50_ms", "p95_ms", "p99_ms", "p50_ms_per_query",
              "p95_ms_per_query", "p99_ms_per_query", "throughput_rows_per_s", "recall_at_k"}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def bench_report(demo_shop, tmp_path_factory):
    ranker = demo_shop / "artifacts" / "ranker"
    out = tmp_path_factory.mktemp("bench")
    result = invoke("bench", demo_shop / "pipeline.toml", "--queries", ranker / "holdout_queries.parquet",
                    "--judgments", ranker / "holdout_judgments.parquet", "--out", out, "--repeats", 2, "--warmup", 1,
                    "--batch-size", 8, "--max-queries", 24, "--encoder-texts", 24,
                    "--set", "encode.sentence_transformers.batch_size=16", "--quiet")
    assert result.exit_code == 0, result.output
    assert "queries/s" in result.output
    return out, json.loads((out / "report.json").read_text())


def test_report_has_every_stage_with_latency_and_recall(bench_report, demo_shop):
    out, report = bench_report
    names = [s["name"] for s in report["stages"]]
    assert names == ["encode.sentence_transformers", "recall.faiss", "lookup.catalog", "filter.rules", "features.text",
                     "rank.lightgbm", "display.topn"]
    for s in report["stages"]:
        assert STAGE_KEYS <= set(s), s["name"]
        assert s["device"] == "cpu" and s["p50_ms"] > 0 and s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"]
    recall, display = report["stages"][1], report["stages"][-1]
    assert recall["rows_in"] == 24 and recall["rows_out"] == 24 * 100 and recall["k"] == 100
    assert 0 < recall["recall_at_k"] <= 1 and 0 < recall["ann_recall_at_k"] <= 1
    assert recall["ann_k"] == 100 and 0 < recall["ann_recall_at_10"] <= 1
    assert display["k"] == 10 and display["recall_at_k"] <= recall["recall_at_k"]
    e = report["end_to_end"]
    assert e["queries"] == 24 and e["batches"] == 3 and e["queries_per_s"] > 0 and e["peak_rss_mb"] > 0
    assert 0 <= e["quality"]["ndcg@10"] <= 1 and e["single_query"]["queries"] == 24
    fp = report["fingerprint"]
    assert fp["cores"] >= 1 and fp["cpu"] and "torch" in fp["libraries"] and "torch" in fp["threads"]
    assert len(report["load_average"]["start"]) == 3
    assert report["overrides"] == {"encode.sentence_transformers": {"batch_size": 16}}
    assert (out / "report.md").read_text().startswith("# funnel bench: demo")
    assert (out / "stages.png").stat().st_size > 1000 and report["plots"] == ["stages.png"]


def test_bare_pipeline_returns_the_same_lists_and_gives_an_overhead_ratio(bench_report):
    _, report = bench_report
    o = report["overhead"]
    assert o["bare_script"] == "pipeline/bench/bare.py" and o["agreement"] == 1.0
    assert o["overhead_ratio"] > 0 and o["bare_s_per_pass"] > 0 and o["overhead_ratio_after_encoder"] > 0
    assert all(s["bare_p50_ms"] > 0 and s["overhead_ratio"] > 0 for s in report["stages"])
    assert report["end_to_end"]["single_query"]["bare_p50_ms"] > 0


def test_encoder_is_compared_with_bare_sentence_transformers(bench_report):
    enc = bench_report[1]["encoder"]
    assert set(enc["sets"]) == {"queries", "items"}
    for s in enc["sets"].values():
        configured = s["variants"]["configured (fp32, batch 16)"]
        assert configured["cosine_min"] > 0.9999 and configured["speedup"] > 0
        # really bf16 (its own bf16 model, not the fp32 one shared with the configured stage)
        assert 0.99 < s["variants"]["bf16, batch 256"]["cosine_min"] < 0.999999


@pytest.mark.slow
def test_sweeps_and_synthetic_ann_write_pareto_plots(demo_shop, tmp_path):
    ranker = demo_shop / "artifacts" / "ranker"
    result = invoke("bench", demo_shop / "pipeline.toml", "--queries", ranker / "holdout_queries.parquet",
                    "--judgments", ranker / "holdout_judgments.parquet", "--out", tmp_path, "--repeats", 1,
                    "--warmup", 0, "--max-queries", 16, "--batch-size", 16, "--encoder-texts", 0, "--no-bare",
                    "--sweep", "--ann-size", 3000, "--ann-dim", 32, "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["overhead"] is None and report["encoder"] is None
    index = report["sweeps"]["index"][0]
    assert {p["family"] for p in index["points"]} >= {"configured HNSW32", "Flat"}
    flat = [p for p in index["points"] if p["family"] == "Flat"]
    assert flat[0]["recall_at_k"] == 1.0
    assert index["pareto"] and all(p in index["points"] for p in index["pareto"])
    pipe = report["sweeps"]["pipeline"]
    assert {p["param"] for p in pipe["points"]} == {"k", "ef_search"} and pipe["pareto"]
    assert [p["batch_size"] for p in report["sweeps"]["batch_size"]] == [1, 16]
    ann = report["ann"]
    assert ann["vectors"] == 3000 and any(p["family"].startswith("funnel recall.faiss") for p in ann["points"])
    assert {"stages.png", "sweep_index_1.png", "sweep_pipeline.png", "sweep_batch_size.png",
            "ann_synthetic.png"} <= set(report["plots"])
    for name in report["plots"]:
        assert (tmp_path / name).stat().st_size > 1000


def test_bare_baseline_refuses_a_stage_it_does_not_cover(tmp_path):
    config = tmp_path / "plugin.toml"
    config.write_text('[[stages]]\ntype = "plugin.custom_rerank"\n')  # a third-party stage type
    with pytest.raises(Unsupported, match="plugin.custom_rerank"):
        BarePipeline(config)


def test_bare_baseline_covers_every_built_in_stage_type_or_says_why_not():
    """Every stage type pyproject.toml registers is re-done by the baseline, or listed in
    NOT_COVERED with a reason (so `funnel bench` gives an overhead_ratio on the pipelines users run)."""
    registered = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["funnel.stages"])
    assert not set(bare.SUPPORTED) & set(bare.NOT_COVERED)
    assert registered == set(bare.SUPPORTED) | set(bare.NOT_COVERED), (
        f"not covered and not listed: {sorted(registered - set(bare.SUPPORTED) - set(bare.NOT_COVERED))}; "
        f"listed but not registered: {sorted((set(bare.SUPPORTED) | set(bare.NOT_COVERED)) - registered)}")
    assert all(reason.strip() for reason in bare.NOT_COVERED.values())


LEXICAL_HYBRID = """
[pipeline]
name = "lexical-hybrid"
inputs = { query_id = "any", query = "string" }

[data]
catalog = "data/catalog.parquet"
judgments = "data/judgments.parquet"

[[stages]]
type = "query.spelling"
params = { vocabulary = "artifacts/spelling", min_count = 2 }

[[stages]]
type = "recall.fused"
[stages.params]
method = "rrf"
k = 60
sources = [
  { name = "stems", stages = [ { type = "recall.bm25", params = { index = "artifacts/bm25", k = 40, item_text = ["title"], k1 = 0.9, b = 0.4 } } ] },
  { name = "plain", weight = 0.5, stages = [ { type = "recall.bm25", params = { index = "artifacts/bm25-plain", k = 30, item_text = ["title", "brand"], stemmer = "", stopwords = [], method = "bm25+" } } ] },
]

[[stages]]
type = "lookup.catalog"
params = { items = "artifacts/items", columns = ["title", "brand", "color", "material"] }

[[stages]]
type = "filter.rules"
params = { rules = [{ column = "title", op = "not_null" }] }

[[stages]]
type = "features.text"
[stages.params]
features = ["recall_score", "fusion_rank", "source_scores", "source_ranks", "n_sources", "overlap", "coverage", "jaccard",
            "stem_overlap", "stem_coverage", "title_len", "query_len", "number_match", "query_has_number", "brand_match",
            "color_match", "material_match"]
sources = ["stems", "plain"]

[[stages]]
type = "features.item_stats"
params = { stats = "artifacts/item_stats", brand_column = "brand", depth = 10 }

[[stages]]
type = "rank.lightgbm"
params = { model = "artifacts/ranker", n_estimators = 30, holdout_fraction = 0.3, valid_fraction = 0.2 }

[[stages]]
type = "display.topn"
params = { n = 20, variant_key = "title", cap_column = "brand", cap = 5 }
"""


@pytest.mark.slow
def test_bare_baseline_of_a_fused_lexical_pipeline_returns_the_same_lists(tmp_path):
    """Spelling correction, recall.fused over two BM25 sources, every text feature, item statistics and
    variant collapse: the bare baseline runs it (nothing skipped) and agrees with Funnel on every query."""
    from pipeline.build import build_artifacts
    from pipeline.config import load_config
    from pipeline.demo_data import generate_demo_data

    generate_demo_data(tmp_path / "data", n_items=300, n_queries=90, seed=2)
    (tmp_path / "pipeline.toml").write_text(LEXICAL_HYBRID)
    build_artifacts(load_config(tmp_path / "pipeline.toml"), progress=False, log=lambda m: None)
    ranker = tmp_path / "artifacts" / "ranker"
    result = invoke("bench", tmp_path / "pipeline.toml", "--queries", ranker / "holdout_queries.parquet",
                    "--out", tmp_path / "bench", "--repeats", 1, "--warmup", 0, "--batch-size", 16, "--encoder-texts", 0,
                    "--bare", "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert report["overhead"]["agreement"] == 1.0 and report["overhead"]["overhead_ratio"] > 0
    assert all(s["bare_p50_ms"] > 0 for s in report["stages"])


def test_bare_baseline_imports_nothing_from_funnel():
    """The baseline's point is doing the work without Funnel: not one import of its packages."""
    tree = ast.parse(Path(bare.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {("." * n.level) + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    funnel = sorted(n for n in names if n.startswith(".") or n.split(".")[0] in {"pipeline", "stages", "indexes"})
    assert not funnel, f"pipeline/bench/bare.py imports {funnel}"


def test_bare_baseline_imports_from_the_installed_package_without_the_source_benchmarks(tmp_path):
    """hummingbird-ml and ir_datasets install a top-level ``benchmarks`` package that shadows the
    source tree's folder: the baseline must come from ``pipeline.bench`` alone, run from anywhere."""
    shadow = tmp_path / "site" / "benchmarks"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")  # what those distributions install: no bare_pipeline in it
    code = ("import sys\n"
            f"sys.path = [p for p in sys.path if p not in ('', {str(REPO)!r})]\n"
            f"sys.path.insert(0, {str(shadow.parent)!r})\n"
            "import benchmarks, pipeline.bench, pipeline.bench.bare as bare\n"
            f"assert not benchmarks.__file__.startswith({str(REPO / 'benchmarks')!r}), benchmarks.__file__\n"
            "assert bare.__file__.endswith('pipeline/bench/bare.py'), bare.__file__\n"
            "assert 'benchmarks.bare_pipeline' not in sys.modules\n"
            "print(bare.__name__, bare.SUPPORTED[0])\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["pipeline.bench.bare", "encode.sentence_transformers"]


def test_every_package_folder_is_in_the_wheel():
    """``[tool.setuptools] packages`` lists packages one by one: a new sub-package (such as
    ``pipeline.bench``) missing there would be left out of an installed, non-source copy."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for top in ("pipeline", "stages", "indexes")
             for p in (REPO / top).rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml [tool.setuptools] packages: {sorted(found - listed)}"


def test_overrides_are_toml_values_or_plain_strings():
    assert parse_override("encode.sentence_transformers.batch_size=256") == ("encode.sentence_transformers", "batch_size", 256)
    assert parse_override("encode.sentence_transformers.precision=bf16") == ("encode.sentence_transformers", "precision", "bf16")
    assert parse_override('filter.rules.rules=[{column = "a", op = "is_null"}]')[2] == [{"column": "a", "op": "is_null"}]
    with pytest.raises(ConfigError, match="STAGE_TYPE.PARAM=VALUE"):
        parse_override("batch_size=256")


def test_latency_summary_percentiles_per_batch_and_per_query():
    s = latency_summary([0.010, 0.020, 0.030, 0.040, 0.100], [10, 10, 10, 10, 20])
    assert s["p50_ms"] == pytest.approx(30.0)
    assert s["p95_ms"] == pytest.approx(88.0)  # numpy's linear interpolation: 40 + 0.8 * 60
    assert s["p50_ms_per_query"] == pytest.approx(3.0)
    assert s["p99_ms_per_query"] == pytest.approx(4.96)  # per query 1, 2, 3, 4, 5 ms: 4 + 0.96 * 1
    assert latency_summary([])["p50_ms"] is None


def test_pareto_front_keeps_only_points_nobody_beats():
    points = [{"name": "a", "recall": 0.90, "ms": 1.0}, {"name": "b", "recall": 0.95, "ms": 2.0},
              {"name": "c", "recall": 0.93, "ms": 3.0},  # beaten by b: lower recall, slower
              {"name": "d", "recall": 0.99, "ms": 5.0}, {"name": "e", "recall": 0.90, "ms": 1.5},  # beaten by a
              {"name": "f", "recall": None, "ms": 0.1}]
    front = pareto_front(points, quality="recall", cost="ms")
    assert [p["name"] for p in front] == ["a", "b", "d"]


def test_synthetic_vectors_are_normalised_and_reproducible():
    xb, xq = synthetic_vectors(500, 16, n_queries=20, seed=3)
    assert xb.shape == (500, 16) and xq.shape == (20, 16) and xb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(xb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(synthetic_vectors(500, 16, n_queries=20, seed=3)[0], xb)


@pytest.mark.parametrize("factory", ["Flat", "HNSW8", "IVF4,Flat"])
def test_stored_vectors_are_the_indexed_vectors(factory):
    from indexes.faiss_index import FaissIndex

    xb, _ = synthetic_vectors(300, 8, n_queries=1, seed=0)
    index = FaissIndex.build(xb, pa.array(np.arange(300)), factory=factory, normalize=False)
    np.testing.assert_allclose(stored_vectors(index._cpu_index), xb, atol=1e-6)


@pytest.mark.parametrize("last_n", [None, 1])
def test_bare_history_filter_keeps_the_rows_funnel_keeps(tmp_path, last_n):
    import polars as pl

    from stages.history import HistoryFilter

    config = tmp_path / "history.toml"
    config.write_text('[[stages]]\ntype = "filter.history"\n' + (f"params = {{ last_n = {last_n} }}\n" if last_n else ""))
    table = pa.table({"query_id": ["u1", "u1", "u1", "u2", "u2", "u3"], "item_id": ["a", "b", "c", "a", "d", "e"],
                      "history": [["b", "a"], ["b", "a"], ["b", "a"], None, None, []]})
    want = HistoryFilter(last_n=last_n)(table)
    got = BarePipeline(config).run(table)
    assert got.select("query_id", "item_id").rows() == pl.from_arrow(want.select(["query_id", "item_id"])).rows()


@pytest.mark.parametrize("exclude", [True, False])
def test_bare_popularity_recall_returns_funnel_s_lists(tmp_path, exclude):
    import polars as pl

    from pipeline.build import build_artifacts
    from pipeline.config import PipelineConfig, load_config

    logs = pa.table({"user_id": ["u1", "u2", "u3", "u4"], "items": [["a", "b", "c"], ["b", "c"], ["c", "d"], ["e", "c", "b"]]})
    import pyarrow.parquet as pq

    pq.write_table(logs, tmp_path / "logs.parquet")
    PipelineConfig(stages=[{"type": "recall.popularity", "params": {"index": "artifacts/pop", "k": 3, "exclude_history": exclude}}],
                   data={"logs": "logs.parquet"}, inputs={"query_id": "string", "history": "list<string>"}).save(tmp_path / "p.toml")
    stage = build_artifacts(load_config(tmp_path / "p.toml"), progress=False, log=lambda m: None).stages[0]
    stage.warm_up()
    queries = pa.table({"query_id": ["q1", "q2", "q3"], "history": [["c", "b"], [], None]})
    want = pl.from_arrow(stage(queries).select(["query_id", "item_id", "score", "rank", "source"]))
    got = BarePipeline(tmp_path / "p.toml").run(queries).select(want.columns)
    assert got.rows() == want.rows()


def random_logs(rng, folder) -> list[str]:
    """120 users' random sequences over 40 items (i0 ... i39) written to ``folder``/logs.parquet; the items."""
    import pyarrow.parquet as pq

    items = [f"i{n}" for n in range(40)]
    pq.write_table(pa.table({"user_id": [f"u{n}" for n in range(120)],
                             "items": [[items[j] for j in rng.integers(0, 40, size=rng.integers(2, 9))] for _ in range(120)]}),
                   folder / "logs.parquet")
    return items


def assert_bare_recall_matches(stage, config, histories, min_rows: int) -> None:
    """The bare baseline of ``config`` recalls what ``stage`` does for these histories (scores to 1e-6)."""
    import polars as pl

    queries = pa.table({"query_id": [f"q{n}" for n in range(len(histories))], "history": histories})
    want = pl.from_arrow(stage(queries).select(["query_id", "item_id", "score", "rank", "source"]))
    got = BarePipeline(config).run(queries).select(want.columns)
    assert want.height > min_rows
    assert got.drop("score").rows() == want.drop("score").rows()
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-6)


@pytest.mark.parametrize("exclude, max_groups", [(True, 2), (False, None)])
def test_bare_group_popularity_recall_returns_funnel_s_lists(tmp_path, exclude, max_groups):
    import pyarrow.parquet as pq

    from pipeline.build import build_artifacts
    from pipeline.config import PipelineConfig, load_config

    rng = np.random.default_rng(7)
    items = random_logs(rng, tmp_path)
    pq.write_table(pa.table({"item_id": items, "brand": [None if n % 9 == 0 else f"b{n % 5}" for n in range(40)]}),
                   tmp_path / "catalog.parquet")
    params = {"index": "artifacts/pop", "groups": "artifacts/groups", "k": 6, "decay": 0.5, "exclude_history": exclude,
              "max_groups": max_groups}
    PipelineConfig(stages=[{"type": "recall.group_popularity", "params": params}],
                   data={"logs": "logs.parquet", "catalog": "catalog.parquet"},
                   inputs={"query_id": "string", "history": "list<string>"}).save(tmp_path / "p.toml")
    stage = build_artifacts(load_config(tmp_path / "p.toml"), progress=False, log=lambda m: None).stages[0]
    stage.warm_up()
    histories = [[items[j] for j in rng.integers(0, 40, size=rng.integers(1, 6))] for _ in range(15)]
    histories += [["i1", "unknown", "i1"], ["unknown"], ["i0"], [], None]
    assert_bare_recall_matches(stage, tmp_path / "p.toml", histories, min_rows=60)


def test_bare_relative_features_equal_funnel_s(tmp_path):
    import polars as pl

    from stages.relative import RelativeFeatures

    rng = np.random.default_rng(8)
    values = rng.normal(size=60).astype(np.float32)
    values[::7] = np.nan
    table = pa.table({"query_id": np.repeat([f"q{n}" for n in range(10)], 6), "item_id": [f"i{n}" for n in range(60)],
                      "f_a": values, "f_b": np.abs(values.round(1)), "f_c": np.zeros(60, np.float32)})
    config = tmp_path / "rel.toml"
    config.write_text('[[stages]]\ntype = "features.relative"\nparams = { columns = ["f_a", "f_b", "f_c"] }\n')
    want = pl.from_arrow(RelativeFeatures(columns=["f_a", "f_b", "f_c"])(table))
    got = BarePipeline(config).run(table).select(want.columns)
    assert got.equals(want)


@pytest.mark.parametrize("exclude", [True, False])
def test_bare_user_vector_recall_returns_funnel_s_lists(tmp_path, exclude):
    import polars as pl

    from indexes.faiss_index import FaissIndex
    from stages.user_vector import UserVectorRecall

    xb, _ = synthetic_vectors(200, 16, n_queries=1, seed=1)
    ids = [f"i{n}" for n in range(200)]
    FaissIndex.build(xb, pa.array(ids), factory="Flat", metric="ip", normalize=True).save(tmp_path / "content")
    config = tmp_path / "uv.toml"
    config.write_text('[[stages]]\ntype = "recall.user_vector"\n'
                      f'params = {{ index = "content", k = 7, recency = 0.6, exclude_history = {str(exclude).lower()} }}\n')
    rng = np.random.default_rng(0)
    histories = [[ids[j] for j in rng.integers(0, 200, size=rng.integers(1, 6))] for _ in range(20)]
    histories += [["i3", "unknown", "i3"], ["unknown"], [], None]
    queries = pa.table({"query_id": [f"u{n}" for n in range(len(histories))], "history": histories})
    stage = UserVectorRecall(index=str(tmp_path / "content"), k=7, recency=0.6, exclude_history=exclude)
    stage.warm_up()
    want = pl.from_arrow(stage(queries).select(["query_id", "item_id", "score", "rank", "source"]))
    got = BarePipeline(config).run(queries).select(want.columns)
    assert got.drop("score").rows() == want.drop("score").rows()
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("source", ["index", "embedding_column"])
def test_bare_mmr_display_shows_funnel_s_lists(tmp_path, source):
    import polars as pl

    from indexes.faiss_index import FaissIndex
    from stages.mmr import MMRDisplay

    xb, _ = synthetic_vectors(120, 8, n_queries=1, seed=2)
    FaissIndex.build(xb, pa.array(np.arange(100, 220)), factory="Flat", metric="ip", normalize=True).save(tmp_path / "vec")
    rng = np.random.default_rng(3)
    rows = []
    for q in (5, 3, 9):  # queries not in id order, one with fewer candidates than shown
        m = 4 if q == 3 else 30
        items = rng.choice(np.arange(100, 230), size=m, replace=False)  # ids >= 220 have no vector
        for r, item in enumerate(items):
            rows.append({"query_id": q, "item_id": int(item), "score": float(rng.normal()), "rank": r + 1})
    table = pa.Table.from_pylist(rows).cast(pa.schema([("query_id", pa.int64()), ("item_id", pa.int64()),
                                                       ("score", pa.float32()), ("rank", pa.int32())]))
    params = {"n": 6, "mmr_lambda": 0.5, "candidates": 20}
    if source == "index":
        params["index"] = str(tmp_path / "vec")
    else:
        vec = np.vstack([xb, np.zeros((10, 8), np.float32)])[table.column("item_id").to_numpy() - 100]
        table = table.append_column("emb", pa.array([list(v) if v.any() else None for v in vec], pa.list_(pa.float32())))
        params["embedding_column"] = "emb"
    config = tmp_path / "mmr.toml"
    config.write_text('[[stages]]\ntype = "display.mmr"\n[stages.params]\n'
                      + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in params.items()))
    stage = MMRDisplay(**params, device="cpu")
    stage.warm_up()
    want = pl.from_arrow(stage(table).select(["query_id", "item_id", "rank"]))
    got = BarePipeline(config).run(table).select(want.columns)
    assert want.height == 16  # 6 + 4 + 6
    assert got.rows() == want.rows()


@pytest.mark.parametrize("exclude", [True, False])
def test_bare_association_recall_returns_funnel_s_lists(tmp_path, exclude):
    from pipeline.build import build_artifacts
    from pipeline.config import PipelineConfig, load_config

    rng = np.random.default_rng(4)
    items = random_logs(rng, tmp_path)
    params = {"index": "artifacts/assoc", "k": 8, "recency": 0.6, "exclude_history": exclude, "beta": 0.4}
    PipelineConfig(stages=[{"type": "recall.association", "params": params}], data={"logs": "logs.parquet"},
                   inputs={"query_id": "string", "history": "list<string>"}).save(tmp_path / "p.toml")
    stage = build_artifacts(load_config(tmp_path / "p.toml"), progress=False, log=lambda m: None).stages[0]
    stage.warm_up()
    histories = [[items[j] for j in rng.integers(0, 40, size=rng.integers(1, 5))] for _ in range(15)]
    histories += [["i1", "unknown", "i1"], ["unknown"], [], None]
    assert_bare_recall_matches(stage, tmp_path / "p.toml", histories, min_rows=100)


def test_bare_history_features_equal_funnel_s(tmp_path):
    import polars as pl
    import pyarrow.parquet as pq

    from indexes.faiss_index import FaissIndex
    from pipeline.build import BuildContext, build_artifacts
    from pipeline.config import PipelineConfig, load_config
    from stages.history import HistoryFeatures

    rng = np.random.default_rng(5)
    items = random_logs(rng, tmp_path)
    for kind, folder in (("recall.association", "artifacts/association"), ("recall.popularity", "artifacts/popularity")):
        PipelineConfig(stages=[{"type": kind, "params": {"index": folder}}], data={"logs": "logs.parquet"},
                       inputs={"query_id": "string", "history": "list<string>"}).save(tmp_path / "p.toml")
        build_artifacts(load_config(tmp_path / "p.toml"), progress=False, log=lambda m: None)
    xb, _ = synthetic_vectors(35, 8, n_queries=1, seed=6)  # i35..i39 have no vector
    FaissIndex.build(xb, pa.array(items[:35]), factory="Flat", metric="ip", normalize=True).save(tmp_path / "artifacts/content")
    pq.write_table(pa.table({"item_id": items, "brand": [None if n % 7 == 0 else f"b{n % 4}" for n in range(40)]}),
                   tmp_path / "catalog.parquet")
    own = HistoryFeatures(association=None, content=None, popularity=None, transitions="artifacts/transitions",
                          groups="artifacts/groups")
    own._base_dir = tmp_path
    own.build(None, BuildContext(PipelineConfig(stages=[], data={"logs": "logs.parquet", "catalog": "catalog.parquet"},
                                                base_dir=tmp_path), progress=False, log=lambda m: None))
    histories = [[items[j] for j in rng.integers(0, 40, size=rng.integers(1, 6))] for _ in range(12)]
    histories += [["i1", "unknown", "i2"], ["i3", "unknown"], ["unknown"], [], None]
    rows = [{"query_id": f"q{q}", "item_id": items[j] if j < 40 else "new", "history": h,
             "score": float(rng.normal()), "rank": r + 1}
            for q, h in enumerate(histories) for r, j in enumerate(rng.integers(0, 41, size=6))]
    table = pa.Table.from_pylist(rows)
    paths = {name: str(tmp_path / "artifacts" / name)
             for name in ("association", "content", "popularity", "transitions", "groups")}
    config = tmp_path / "hf.toml"
    config.write_text('[[stages]]\ntype = "features.history"\n[stages.params]\nrecency = 0.5\n'
                      + "".join(f'{k} = "{v}"\n' for k, v in paths.items()))
    stage = HistoryFeatures(**paths, recency=0.5)
    stage.warm_up()
    want = pl.from_arrow(stage(table))
    got = BarePipeline(config).run(table).select(want.columns)
    feats = [c for c in want.columns if c.startswith("f_")]
    assert len(feats) == 20
    assert (want["f_assoc_sum"] > 0).sum() > 10 and want["f_sim_mean"].is_not_nan().sum() > 10 and (want["f_pop_count"] > 0).sum() > 10
    assert (want["f_next_last"] > 0).sum() > 3 and (want["f_group_share"] > 0).sum() > 10 and (want["f_group_last"] > 0).sum() > 5
    assert got.drop(feats).rows() == want.drop(feats).rows()
    for c in feats:
        np.testing.assert_allclose(got[c].to_numpy(), want[c].to_numpy(), rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=c)


def test_bare_baseline_resolves_the_config_version_in_artifact_paths():
    params = {"index": "artifacts/{version}/association", "sources": [{"stages": [{"params": {"index": "a/{version}"}}]}], "k": 3}
    assert bare._with_version(params, "v2") == {"index": "artifacts/v2/association",
                                                "sources": [{"stages": [{"params": {"index": "a/v2"}}]}], "k": 3}


def test_bare_sequence_recall_and_features_equal_funnel_s(tmp_path):
    """The bare SASRec (plain torch modules loaded from the same safetensors) recalls the lists
    recall.sequence does and gives features.sequence's score, rank and log-probability, for
    histories longer than max_len, with unknown items, empty and null."""
    import polars as pl

    from indexes.faiss_index import FaissIndex
    from pipeline.build import build_artifacts
    from pipeline.config import PipelineConfig, load_config

    rng = np.random.default_rng(3)
    items = random_logs(rng, tmp_path)
    xb, _ = synthetic_vectors(40, 8, n_queries=1, seed=2)
    FaissIndex.build(xb, pa.array(items), factory="Flat", metric="ip", normalize=True).save(tmp_path / "content")
    model = {"model": "seq", "content": "content", "dim": 16, "layers": 2, "heads": 2, "max_len": 4, "epochs": 2,
             "batch_size": 32, "valid_users": 10, "num_threads": 1, "device": "cpu"}
    PipelineConfig(stages=[{"type": "recall.sequence", "params": {**model, "k": 6}},
                           {"type": "features.sequence", "params": model}],
                   data={"logs": "logs.parquet"}, inputs={"query_id": "string", "history": "list<string>"}).save(tmp_path / "p.toml")
    recall, feats = build_artifacts(load_config(tmp_path / "p.toml"), progress=False, log=lambda m: None).stages
    recall.warm_up()
    feats.warm_up()
    histories = [[items[j] for j in rng.integers(0, 40, size=rng.integers(1, 9))] for _ in range(15)]
    histories += [["i1", "unknown", "i2", "i3", "i4", "i5", "i6"], ["unknown"], [], None]
    (tmp_path / "recall.toml").write_text('[[stages]]\ntype = "recall.sequence"\n'
                                          f'params = {{ model = "seq", k = 6, num_threads = 1, device = "cpu" }}\n')
    assert_bare_recall_matches(recall, tmp_path / "recall.toml", histories, min_rows=80)

    queries = pa.table({"query_id": [f"q{n}" for n in range(len(histories))], "history": histories})
    cands = pl.from_arrow(recall(queries)).vstack(pl.DataFrame(
        {"query_id": ["q0", "q0", "q16", "q18"], "history": [histories[0], histories[0], histories[16], None],
         "item_id": ["unknown", histories[0][0], "i1", "i2"], "score": [0.0] * 4, "rank": [7, 8, 1, 1],
         "source": ["x"] * 4}, schema_overrides={"score": pl.Float32, "rank": pl.Int32}))
    (tmp_path / "feats.toml").write_text('[[stages]]\ntype = "features.sequence"\n'
                                         'params = { model = "seq", num_threads = 1, device = "cpu" }\n')
    want = pl.from_arrow(feats(cands.to_arrow()))
    got = BarePipeline(tmp_path / "feats.toml").run(cands).select(want.columns)
    assert got.drop("^f_seq_.*$").equals(want.drop("^f_seq_.*$"))
    for name in ("f_seq_score", "f_seq_rank", "f_seq_logp"):
        np.testing.assert_allclose(got[name].to_numpy(), want[name].to_numpy(), rtol=1e-5, atol=1e-5)
    assert np.isnan(want["f_seq_score"].to_numpy()[-4:-1]).all() and np.isfinite(want["f_seq_score"].to_numpy()[:-4]).all()


@pytest.mark.parametrize("mode", ["history", "results"])
def test_bare_vector_features_equal_funnel_s(tmp_path, mode):
    """features.vectors in both modes: the bare cosines equal the stage's, NaN where it has NaN."""
    import polars as pl

    from indexes.faiss_index import FaissIndex
    from stages.vector_features import VectorFeatures

    xb, _ = synthetic_vectors(50, 8, n_queries=1, seed=4)
    ids = [f"i{n}" for n in range(50)]
    FaissIndex.build(xb, pa.array(ids), factory="Flat", metric="ip", normalize=True).save(tmp_path / "image")
    rng = np.random.default_rng(5)
    rows = []
    for q in range(12):
        hist = [ids[j] for j in rng.integers(0, 50, size=rng.integers(0, 5))] + (["unknown"] if q % 4 == 0 else [])
        cands = [ids[j] for j in rng.permutation(50)[: rng.integers(1, 15)]] + (["zz"] if q % 3 == 0 else [])
        ranks = rng.permutation(len(cands)) + 1
        rows += [(f"q{q}", hist, c, int(r)) for c, r in zip(cands, ranks)]
    table = pa.table({"query_id": [r[0] for r in rows], "history": [r[1] for r in rows], "item_id": [r[2] for r in rows],
                      "rank": pa.array([r[3] for r in rows], pa.int32())})
    params = {"source": "img", "mode": mode, "recency": 0.5, "top_m": 3}
    stage = VectorFeatures(index=str(tmp_path / "image"), **params)
    want = pl.from_arrow(stage(table))
    (tmp_path / "v.toml").write_text('[[stages]]\ntype = "features.vectors"\n'
                                     f'params = {{ index = "image", source = "img", mode = "{mode}", recency = 0.5, top_m = 3 }}\n')
    got = BarePipeline(tmp_path / "v.toml").run(table).select(want.columns)
    names = stage.produced_columns().names
    assert got.drop(names).equals(want.drop(names))
    for name in names:
        assert np.isfinite(want[name].to_numpy()).sum() > len(rows) // 2
        np.testing.assert_allclose(got[name].to_numpy(), want[name].to_numpy(), rtol=1e-5, atol=1e-6)


def test_bare_cross_encoder_rerank_equals_funnel_s(tmp_path):
    """rerank.cross_encoder: bare CrossEncoder.predict on the top k, the same new order, scores and features."""
    import polars as pl

    from stages.cross_encoder import CrossEncoderReranker, save_untrained

    save_untrained(tmp_path / "ce", layers=1)
    words = ["drill", "bit", "saw", "blade", "paint", "brush", "white", "cordless", "hammer", "nail", "wood", "screw"]
    rows = [{"query_id": q, "query": f"{words[q]} {words[q + 2]}", "item_id": f"i{q}-{r}",
             "title": None if r == 3 else " ".join(words[(q + r + j) % 12] for j in range(1 + r % 5)),
             "score": float(20 - r), "rank": r + 1} for q in range(5) for r in range(9)]
    table = pa.Table.from_pylist(rows, schema=pa.schema([("query_id", pa.int64()), ("query", pa.string()), ("item_id", pa.string()),
                                                         ("title", pa.string()), ("score", pa.float32()), ("rank", pa.int32())]))
    want = pl.from_arrow(CrossEncoderReranker(model=str(tmp_path / "ce"), k=4, precision="fp32", device="cpu")(table))
    (tmp_path / "ce.toml").write_text('[[stages]]\ntype = "rerank.cross_encoder"\n'
                                      'params = { model = "ce", k = 4, precision = "fp32", device = "cpu" }\n')
    got = BarePipeline(tmp_path / "ce.toml").run(table).select(want.columns)
    assert got.select("query_id", "item_id", "rank", "recall_rank").rows() == want.select("query_id", "item_id", "rank", "recall_rank").rows()
    for name in ("score", "recall_score", "f_ce_score", "f_prev_score"):
        np.testing.assert_allclose(got[name].to_numpy(), want[name].to_numpy(), rtol=1e-5, atol=1e-5)
    assert np.isfinite(want["f_ce_score"].to_numpy()).sum() == 20
