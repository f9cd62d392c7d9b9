"""The local batch runner: sharded and single-file output, manifest, lock, bad shards, one-query path."""

from __future__ import annotations

import fcntl
import json
import shutil

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import ConfigError, DataError
from pipeline.lock import read_lock
from pipeline.runner import lock_file, quarantine_file, run_to_parquet
from pipeline.testing import assert_tables_close


def rows(path) -> list[str]:
    """Every row of a Parquet file or shard folder, as sortable text (a multiset of rows)."""
    return sorted(repr(sorted(r.items())) for r in ds.dataset(path).to_table().to_pylist())


@pytest.fixture(scope="module")
def queries(demo_shop, tmp_path_factory):
    """40 demo queries (kept small: every test runs the whole demo pipeline)."""
    path = tmp_path_factory.mktemp("queries") / "queries.parquet"
    pq.write_table(pq.read_table(demo_shop / "data" / "queries.parquet").slice(0, 40), path)
    return path


@pytest.fixture(scope="module")
def reference(demo_pipeline, queries, tmp_path_factory):
    """One uninterrupted run into a single file, batch size 16."""
    out = tmp_path_factory.mktemp("ref") / "ref.parquet"
    run_to_parquet(demo_pipeline, queries, out, batch_size=4, progress=False)
    return out


def test_folder_output_is_shards_with_manifest_and_lock(demo_pipeline, queries, reference, tmp_path):
    out = tmp_path / "out"
    summary = run_to_parquet(demo_pipeline, queries, out, batch_size=4, shard_rows=10, progress=False,
                             name="demo", inputs={"query_id": "any", "query": "string"})
    n = pq.read_metadata(queries).num_rows
    assert summary.units == 4 and summary.queries == n and not summary.skipped  # 10 rounds up to 12 = 3 batches
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [f"part-{i:05d}.parquet" for i in range(4)]
    assert rows(out) == rows(reference)  # same batches, so the same bits, however the work is split
    manifest = json.loads((out / "_funnel_manifest.json").read_text())
    assert manifest["complete"] and len(manifest["done"]) == 4 and manifest["shard_rows"] == 12
    lock = read_lock(lock_file(out))
    assert lock["output"]["queries"] == n and lock["output"]["rows"] == summary.rows
    assert "[[stages]]" in lock["config_toml"] and 'name = "demo"' in lock["config_toml"]
    assert any("recall.faiss index" in k for k in lock["artifacts"]) and "pyarrow" in lock["libraries"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_single_file_output_is_merged_atomically_and_staging_removed(demo_pipeline, queries, reference, tmp_path):
    out = tmp_path / "x.parquet"
    run_to_parquet(demo_pipeline, queries, out, batch_size=4, shard_rows=16, progress=False)
    assert pq.read_metadata(out).num_rows == pq.read_metadata(reference).num_rows
    assert rows(out) == rows(reference)
    assert (tmp_path / "x.lock.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.lock.json", "x.parquet"]


def test_rerun_of_a_complete_run_does_nothing_unless_overwrite(demo_pipeline, queries, tmp_path):
    out = tmp_path / "out"
    first = run_to_parquet(demo_pipeline, queries, out, batch_size=32, progress=False)
    stamp = (out / "part-00000.parquet").stat().st_mtime_ns
    again = run_to_parquet(demo_pipeline, queries, out, batch_size=32, progress=False)
    assert again.skipped and again.rows == first.rows and not again.stages
    assert (out / "part-00000.parquet").stat().st_mtime_ns == stamp
    forced = run_to_parquet(demo_pipeline, queries, out, batch_size=32, progress=False, overwrite=True)
    assert not forced.skipped and forced.rows == first.rows


def test_a_changed_config_input_or_artifact_refuses_the_old_output(demo_shop, demo_pipeline, queries, tmp_path):
    out = tmp_path / "out.parquet"
    run_to_parquet(demo_pipeline, queries, out, batch_size=32, progress=False)
    with pytest.raises(ConfigError, match=r"holds a finished run that does not match this one: the pipeline config "
                                          r"changed \(stage 7 display.topn: n 10 -> 3\); pass --overwrite"):
        run_to_parquet(demo_pipeline.with_top(3), queries, out, batch_size=32, progress=False)
    other = tmp_path / "q.parquet"
    pq.write_table(pq.read_table(queries).slice(0, 20), other)
    with pytest.raises(ConfigError, match=r"the queries in .* changed \(q.parquet added; queries.parquet removed\)"):
        run_to_parquet(demo_pipeline, other, out, batch_size=32, progress=False)

    shop = tmp_path / "shop"
    shutil.copytree(demo_shop, shop)
    from pipeline.config import load_config

    pipe = load_config(shop / "pipeline.toml").build()
    mine = tmp_path / "mine"
    run_to_parquet(pipe, queries, mine, batch_size=64, progress=False, shard_rows=64)
    manifest = shop / "artifacts" / "ranker" / "manifest.json"
    manifest.write_text(manifest.read_text().replace("{", '{"retrained": true, ', 1))
    with pytest.raises(ConfigError, match=r"artifact step 6 rank.lightgbm model changed"):
        run_to_parquet(load_config(shop / "pipeline.toml").build(), queries, mine, batch_size=64, progress=False)


def test_lock_file_reproduces_or_refuses_with_the_differences(demo_pipeline, queries, tmp_path):
    out = tmp_path / "a"
    run_to_parquet(demo_pipeline, queries.parent / "queries.parquet", out, batch_size=64, progress=False)
    lock = lock_file(out)
    again = run_to_parquet(demo_pipeline, queries, tmp_path / "b", batch_size=64, progress=False, lock=lock)
    assert again.rows > 0 and rows(tmp_path / "b") == rows(out)
    with pytest.raises(ConfigError, match=r"does not match lock file .*config: stage 7 display.topn: n 10 -> 3"):
        run_to_parquet(demo_pipeline.with_top(3), queries, tmp_path / "c", batch_size=64, progress=False, lock=lock)
    doc = json.loads(lock.read_text())
    doc["libraries"]["pyarrow"] = "1.0.0"
    doc["artifacts"]["step 2 recall.faiss index"]["sha256"] = "0" * 64
    tampered = tmp_path / "tampered.lock.json"
    tampered.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"artifact step 2 recall.faiss index: lock .*library pyarrow: lock 1.0.0, "
                                          rf"now {pa.__version__}"):
        run_to_parquet(demo_pipeline, queries, tmp_path / "d", batch_size=64, progress=False, lock=tampered)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_unprocessable_rows_are_quarantined_beside_a_folder_output(demo_pipeline, tmp_path):
    queries = tmp_path / "q.parquet"
    pq.write_table(pa.table({"query_id": [1, 2, 3, 4], "query": ["cordless drill", None, "   ", "paint"]}), queries)
    out = tmp_path / "out"
    summary = run_to_parquet(demo_pipeline, queries, out, batch_size=2, shard_rows=2, progress=False)
    assert summary.quarantined == 2 and summary.quarantine == quarantine_file(out) == out / "_quarantine.parquet"
    assert sorted(pq.read_table(summary.quarantine).column("query_id").to_pylist()) == ["2", "3"]
    assert set(ds.dataset(out).to_table().column("query_id").to_pylist()) == {1, 4}  # the dataset skips _files
    assert not (out / "_quarantine").exists()


def _shard_folder(queries, folder):
    table = pq.read_table(queries)
    folder.mkdir()
    pq.write_table(table.slice(0, 15), folder / "a.parquet")
    pq.write_table(table.slice(15, 25), folder / "b.parquet", row_group_size=7)
    (folder / "_SUCCESS").write_text("")
    (folder / ".a.parquet.crc").write_bytes(b"\0")
    return table


def test_a_folder_of_shards_is_read_in_batches_whatever_its_row_groups(demo_pipeline, queries, tmp_path):
    whole = tmp_path / "whole.parquet"
    pq.write_table(_shard_folder(queries, tmp_path / "in"), whole)
    summary = run_to_parquet(demo_pipeline, tmp_path / "in", tmp_path / "out", batch_size=4, shard_rows=8,
                             progress=False)
    assert summary.queries == 40 and summary.units == 2 + 4
    single = run_to_parquet(demo_pipeline, whole, tmp_path / "one.parquet", batch_size=10, progress=False)
    assert single.rows == summary.rows
    assert ds.dataset(tmp_path / "out").to_table().column("query_id").unique().to_pylist() == list(range(1, 41))


@pytest.mark.parametrize("bad, expected", [
    (lambda p: p.write_bytes(b"PAR1 this is not parquet"), "not readable as Parquet"),
    (lambda p: pq.write_table(pa.table({"query_id": [1]}), p), "needs column 'query'"),
])
def test_a_bad_shard_fails_naming_it_or_is_skipped_and_quarantined(demo_pipeline, queries, tmp_path, bad, expected):
    _shard_folder(queries, tmp_path / "in")
    bad(tmp_path / "in" / "c.parquet")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"--skip-bad-shards") as failed:
        run_to_parquet(demo_pipeline, tmp_path / "in", out, batch_size=16, progress=False)
    assert expected in str(failed.value) and str(tmp_path / "in" / "c.parquet") in str(failed.value)
    summary = run_to_parquet(demo_pipeline, tmp_path / "in", out, batch_size=16, progress=False, skip_bad_shards=True)
    assert summary.queries == 40 and len(summary.bad_shards) == 1 and "c.parquet" in summary.bad_shards[0]
    entry = pq.read_table(quarantine_file(out)).to_pylist()
    assert [(r["stage"], r["reason"].split(":")[0]) for r in entry] == [("input", "shard c.parquet")]
    assert expected in entry[0]["reason"]


def test_a_second_run_into_the_same_output_is_refused_while_one_holds_it(demo_pipeline, queries, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".run.pid", "a+") as held:
        held.write("4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DataError, match=r"another funnel run \(pid 4242\) is writing"):
            run_to_parquet(demo_pipeline, queries, out, progress=False)


def test_an_existing_file_not_written_by_a_run_is_not_replaced_silently(demo_pipeline, queries, tmp_path):
    out = tmp_path / "mine.parquet"
    pq.write_table(pa.table({"x": [1]}), out)
    with pytest.raises(DataError, match="has no lock file mine.lock.json .*--overwrite"):
        run_to_parquet(demo_pipeline, queries, out, progress=False)
    assert run_to_parquet(demo_pipeline, queries, out, progress=False, overwrite=True).rows > 0


def test_run_one_equals_the_batch_path(demo_pipeline, demo_queries, reference):
    batch = pq.read_table(reference)
    for query in demo_queries.slice(0, 4).to_pylist():
        one = demo_pipeline.run_one(**query)
        mine = batch.filter(pa.compute.equal(batch.column("query_id"), query["query_id"])).sort_by("rank")
        assert one.column("item_id").to_pylist() == mine.column("item_id").to_pylist()
        assert one.column("rank").to_pylist() == mine.column("rank").to_pylist()
        # alone or among 15 others the encoder pads differently: equal up to float noise
        assert_tables_close(one.select(mine.column_names), mine)


def test_cli_run_reports_resume_state_and_rejects_ray_options_without_ray(demo_shop, queries, tmp_path):
    config, out = demo_shop / "pipeline.toml", tmp_path / "out"
    args = ["run", str(config), "--queries", str(queries), "--out", str(out), "--quiet", "--shard-rows", "64"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0 and "with the local engine" in first.output and "_funnel.lock.json" in first.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "nothing to do (--overwrite to run again)" in again.output
    changed = CliRunner().invoke(main, args + ["--top", "3"])
    assert changed.exit_code == 2 and "funnel: error:" in changed.output and "--overwrite" in changed.output
    lock = CliRunner().invoke(main, ["run", str(config), "--queries", str(queries), "--out", str(tmp_path / "b"),
                                     "--quiet", "--top", "3", "--lock", str(lock_file(out))])
    assert lock.exit_code == 2 and "does not match lock file" in lock.output
    usage = CliRunner().invoke(main, args + ["--address", "auto"])
    assert usage.exit_code == 2 and "--engine ray" in usage.output


def test_empty_queries_warn_and_load_nothing(demo_shop, tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import FunnelWarning

    queries = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"query_id": pa.array([], pa.int64()), "query": pa.array([], pa.string())}), queries)
    pipe = load_config(demo_shop / "pipeline.toml").build()
    with pytest.warns(FunnelWarning, match="have no rows: writing an empty output without loading the pipeline"):
        summary = run_to_parquet(pipe, queries, tmp_path / "out.parquet", progress=False)
    assert not any(stage.is_warm for stage in pipe.stages)
    assert summary.queries == 0 and summary.load_seconds == 0 and lock_file(tmp_path / "out.parquet").exists()
    assert pq.read_metadata(tmp_path / "out.parquet").num_rows == 0
