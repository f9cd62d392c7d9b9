"""The Ray Data engine: same rows as the local runner, and an actor killed mid-job changes nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.lock import read_lock
from pipeline.runner import lock_file, quarantine_file, run_to_parquet

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'funnel-rank[ray]')")

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow


def rows(path) -> list[str]:
    return sorted(repr(sorted(r.items())) for r in ds.dataset(path).to_table().to_pylist())


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (2 CPUs); the crash-stage module importable by its workers."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(HERE), "HF_HUB_OFFLINE": "1",
                                       "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def queries(demo_shop, tmp_path_factory):
    """32 demo queries plus two a stage must quarantine (null and blank text), in two shards."""
    table = pq.read_table(demo_shop / "data" / "queries.parquet").slice(0, 32)
    bad = pa.table({"query_id": pa.array([9001, 9002], table.schema.field("query_id").type),
                    "query": pa.array([None, "  "], pa.string())})
    folder = tmp_path_factory.mktemp("rayq") / "queries"
    folder.mkdir()
    pq.write_table(table.slice(0, 20), folder / "a.parquet")
    pq.write_table(pa.concat_tables([table.slice(20), bad]), folder / "b.parquet")
    return folder


@pytest.fixture(scope="module")
def reference(demo_pipeline, queries, tmp_path_factory):
    out = tmp_path_factory.mktemp("rayref") / "ref"
    run_to_parquet(demo_pipeline, queries, out, batch_size=4, progress=False)
    return out


def test_ray_engine_writes_the_local_runners_rows_and_quarantine(local_ray, demo_shop, queries, reference, tmp_path):
    out = tmp_path / "ray.parquet"
    args = ["run", str(demo_shop / "pipeline.toml"), "--queries", str(queries), "--out", str(out), "--engine", "ray",
            "--batch-size", "4", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "with the ray engine" in result.output and "quarantined 2 row(s)" in result.output
    assert rows(out) == rows(reference)
    assert rows(quarantine_file(out)) == rows(quarantine_file(reference))
    assert read_lock(lock_file(out))["output"]["engine"] == "ray"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ray.lock.json", "ray.parquet", "ray.quarantine.parquet"]
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "nothing to do" in again.output


def test_an_actor_killed_mid_job_is_restarted_and_the_output_is_unchanged(local_ray, demo_shop, queries, reference,
                                                                          tmp_path):
    from pipeline.config import load_config
    from pipeline.ray_engine import run_on_ray

    sys.path.insert(0, str(HERE))
    try:
        import ray_crash_stage  # noqa: F401  (registers debug.crash_once in this process)
    finally:
        sys.path.remove(str(HERE))
    marker = tmp_path / "crash-once"
    marker.write_text("")
    cfg = load_config(demo_shop / "pipeline.toml")
    cfg.stages.insert(1, {"type": "debug.crash_once", "params": {"marker": str(marker), "on_query": 14}})
    out = tmp_path / "out"
    summary = run_on_ray(cfg.build(), queries, out, batch_size=4, shard_rows=8, progress=False,
                         imports=["ray_crash_stage"], max_restarts=2, max_task_retries=2)
    assert not marker.exists(), "the crash stage never ran: the actor was not killed"
    assert summary.queries == 34 and summary.quarantined == 2
    assert rows(out) == rows(reference)


def test_a_stage_error_inside_an_actor_reaches_the_user_as_the_funnel_error():
    from pipeline.errors import DataError
    from pipeline.ray_engine import _explain

    worker_text = ("ray::MapWorker(MapBatches(PipelineActor)).submit() (pid=1)\n  File \"stage.py\", line 1, in run\n"
                   "pipeline.errors.DataError: stage 'encode.sentence_transformers': column 'query' has 1 null text "
                   "value(s)\n\nThe above exception was the direct cause of the following exception:\n"
                   "ray.exceptions.UserCodeException: UDF failed to process a data block.")
    error = _explain(RuntimeError(worker_text))
    assert isinstance(error, DataError) and str(error).startswith("stage 'encode.sentence_transformers': column")
    other = _explain(RuntimeError("File \"x.py\"\nValueError: bad thing\nray.exceptions.RayError: wrapped"))
    assert str(other) == "a Ray actor failed: ValueError: bad thing"


def test_empty_queries_start_no_ray(demo_shop, tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import FunnelWarning
    from pipeline.ray_engine import run_on_ray

    queries = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"query_id": pa.array([], pa.int64()), "query": pa.array([], pa.string())}), queries)
    pipe = load_config(demo_shop / "pipeline.toml").build()
    was_running = ray.is_initialized()
    with pytest.warns(FunnelWarning, match="have no rows"):
        summary = run_on_ray(pipe, queries, tmp_path / "out")
    assert ray.is_initialized() == was_running and not any(stage.is_warm for stage in pipe.stages)
    assert summary.queries == 0 and lock_file(tmp_path / "out").exists()


def test_build_engine_ray_trains_the_local_engines_ranker(local_ray, tmp_path, monkeypatch):
    """`funnel build --engine ray`: training candidates from Ray Data actors, the same model as local."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_tests", HERE / "test_build.py")
    build_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_tests)
    monkeypatch.delenv("FUNNEL_MEMORY_LIMIT", raising=False)
    config = build_tests.write_shop(tmp_path, users=200)
    model = tmp_path / "artifacts" / "ranker" / "model.txt"
    assert CliRunner().invoke(main, ["build", str(config), "--quiet"]).exit_code == 0
    local = model.read_text()
    result = CliRunner().invoke(main, ["build", str(config), "--quiet", "--force", "--engine", "ray"])
    assert result.exit_code == 0, result.output
    assert "ranker training candidates on Ray" in result.output
    assert model.read_text() == local
    # several targets per user: each training view's candidates on Ray too, the same model again
    config.write_text(config.read_text().replace("max_train_queries = 300", "max_train_queries = 300, targets_per_user = 2"))
    assert CliRunner().invoke(main, ["build", str(config), "--quiet"]).exit_code == 0
    local_views = model.read_text()
    result = CliRunner().invoke(main, ["build", str(config), "--quiet", "--force", "--engine", "ray"])
    assert result.exit_code == 0, result.output
    assert "(view 2: targets 1 step(s) before the last) on Ray" in result.output
    assert model.read_text() == local_views != local
    bad = CliRunner().invoke(main, ["build", str(config), "--actors", "2"])
    assert bad.exit_code == 2 and "--address and --actors need --engine ray" in bad.output
