"""Resuming interrupted runs: an exception mid-run, and `kill -9` of a real `funnel run` at random points."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.runner import Layout, run_to_parquet


def rows(path) -> list[str]:
    return sorted(repr(sorted(r.items())) for r in ds.dataset(path).to_table().to_pylist())


@pytest.fixture(scope="module")
def queries(demo_shop, tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "queries.parquet"
    pq.write_table(pq.read_table(demo_shop / "data" / "queries.parquet").slice(0, 48), path)
    return path


@pytest.fixture(scope="module")
def reference(demo_pipeline, queries, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "ref.parquet"
    run_to_parquet(demo_pipeline, queries, out, batch_size=4, progress=False)
    return out


class Boom(Exception):
    pass


def fail_at_batch(n: int):
    """A runner observer that raises :class:`Boom` when the ``n``-th batch (1-based) enters the first stage."""
    seen = []

    def observe(step, table):
        if step == 0:
            seen.append(table.num_rows)
            if len(seen) == n:
                raise Boom

    return observe


@pytest.mark.parametrize("out_name", ["out", "out.parquet"])
def test_a_failed_run_resumes_to_exactly_the_uninterrupted_output(demo_pipeline, queries, reference, tmp_path,
                                                                   out_name):
    out = tmp_path / out_name
    with pytest.raises(Boom):
        run_to_parquet(demo_pipeline, queries, out, batch_size=4, shard_rows=8, progress=False,
                       observer=fail_at_batch(7))
    layout = Layout(out)
    assert len(json.loads(layout.manifest.read_text())["done"]) == 3  # units of 2 batches; the 4th was cut
    assert not layout.lock.exists() and (out.is_dir() or not out.exists())
    summary = run_to_parquet(demo_pipeline, queries, out, batch_size=4, shard_rows=8, progress=False)
    assert summary.resumed_units == 3 and summary.units == 6 and summary.queries == 48
    assert sum(s.rows_in for s in summary.stages[:1]) == 48 - 24  # only what was left ran
    assert rows(out) == rows(reference)


def test_a_crash_while_finishing_is_completed_by_the_next_run(demo_pipeline, queries, reference, tmp_path,
                                                               monkeypatch):
    import pipeline.runner as runner

    out = tmp_path / "out.parquet"

    def crash(*args, **kwargs):
        raise Boom

    with monkeypatch.context() as patch:
        patch.setattr(runner, "write_lock", crash)  # the merged file is in place, the lock not yet written
        with pytest.raises(Boom):
            run_to_parquet(demo_pipeline, queries, out, batch_size=4, shard_rows=16, progress=False)
    assert out.exists() and not Layout(out).lock.exists()
    summary = run_to_parquet(demo_pipeline, queries, out, batch_size=4, shard_rows=16, progress=False)
    assert summary.processed == 0 and summary.resumed_units == 3 and not summary.skipped
    assert rows(out) == rows(reference) and Layout(out).lock.exists() and not Layout(out).work.exists()


def test_resuming_with_another_batch_size_is_refused(demo_pipeline, queries, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Boom):
        run_to_parquet(demo_pipeline, queries, out, batch_size=4, shard_rows=4, progress=False,
                       observer=fail_at_batch(2))
    with pytest.raises(Exception, match=r"holds an unfinished run that does not match this one: batch size 4 -> 8"):
        run_to_parquet(demo_pipeline, queries, out, batch_size=8, progress=False)


@pytest.mark.parametrize("out_name", ["out", "out.parquet"])
def test_a_run_that_fails_before_its_first_unit_leaves_nothing(demo_pipeline, queries, tmp_path, out_name):
    """Nothing to resume, so nothing to refuse: the next command, changed or not, starts cleanly."""
    out = tmp_path / out_name

    with pytest.raises(Boom):
        run_to_parquet(demo_pipeline, queries, out, batch_size=4, progress=False, observer=fail_at_batch(1))
    assert list(tmp_path.iterdir()) == []
    summary = run_to_parquet(demo_pipeline, queries, out, batch_size=8, progress=False)
    assert summary.queries == 48 and not summary.resumed_units


def test_an_unfinished_run_without_a_unit_done_is_replaced_not_refused(demo_pipeline, queries, tmp_path):
    """A manifest with no unit done (the process was killed before its first commit) holds nothing to lose."""
    out = tmp_path / "out"
    layout = Layout(out)
    out.mkdir()
    layout.manifest.write_text(json.dumps({"format": "funnel-run/1", "identity": {"batch_size": 4}, "done": {},
                                           "shard_rows": 4, "bad_ranges": []}))
    summary = run_to_parquet(demo_pipeline, queries, out, batch_size=8, progress=False)
    assert summary.queries == 48 and layout.lock.exists()


def _funnel_run(config, queries, out):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config), "--queries", str(queries),
                             "--out", str(out), "--batch-size", "4", "--shard-rows", "8", "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _done_units(layout: Layout) -> int:
    try:
        return len(json.loads(layout.manifest.read_text())["done"])
    except (OSError, ValueError):
        return -1


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_loses_and_duplicates_nothing(demo_shop, queries, reference, tmp_path):
    """Three seeded trials: SIGKILL after a random number of committed units plus a random delay."""
    rng = random.Random(7)
    expected = rows(reference)
    for trial, out_name in enumerate(["out", "out.parquet", "out"]):
        out = tmp_path / f"t{trial}" / out_name
        layout = Layout(out)
        target, delay = rng.randrange(0, 6), rng.uniform(0.0, 0.4)
        proc = _funnel_run(demo_shop / "pipeline.toml", queries, out)
        deadline = time.monotonic() + 300
        while proc.poll() is None and _done_units(layout) < target and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        interrupted = proc.poll() is None
        if interrupted:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        # the lock is written last: if it is there the run had finished (a kill can land between the lock
        # and the interpreter's exit), and then it must cover every unit
        assert not layout.lock.exists() or json.loads(layout.lock.read_text())["output"]["units"] == 6
        resumed = _funnel_run(demo_shop / "pipeline.toml", queries, out)
        output, _ = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, output
        got = rows(out)
        assert got == expected, f"trial {trial}: killed after {target} units (+{delay:.2f} s): output differs"
        table = ds.dataset(out).to_table()
        keys = Counter(zip(table.column("query_id").to_pylist(), table.column("rank").to_pylist()))
        assert max(keys.values()) == 1 and table.num_rows == pq.read_metadata(reference).num_rows
        assert not [p for p in out.parent.rglob("*.tmp")], "temporary files left behind"
