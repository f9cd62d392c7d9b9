"""What a new user meets on a fresh clone (issue 15), through `funnel` as typed in a shell.

Each test runs `python -m pipeline.cli` in a subprocess: exit status, stdout and stderr exactly
as a terminal shows them. A failed start leaves nothing behind, every failure is one
``funnel: error:`` line, odd input (no queries, text the model cannot read) is warned about,
``--quiet`` is quiet and the summary keeps load time out of the throughput.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.runner import EMPTY_INPUT, MANIFEST_NAME

FUNNEL = [sys.executable, "-m", "pipeline.cli"]
ENCODE = 'type = "encode.sentence_transformers"\n\n[stages.params]\n'


def funnel(*args, prelude: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``funnel ARGS`` in a fresh interpreter; ``prelude`` runs first (to hide a package)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = FUNNEL if prelude is None else [sys.executable, "-c",
                                          f"{prelude}\nfrom pipeline.cli import main\nmain(prog_name='funnel')"]
    return subprocess.run([*cmd, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("funnel: error:")]


def one_error_line(proc: subprocess.CompletedProcess, status: int) -> str:
    """The single ``funnel: error:`` line of a failed command, after checking the status and that
    nothing else (no usage block, no traceback) was printed."""
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Usage:" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("funnel: error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def shop(demo_shop, tmp_path_factory):
    """A folder for queries and outputs; the configs sit in the demo shop (their artifact paths
    must stay inside the config's folder): ``config``, ``broken`` and ``top3``."""
    root = tmp_path_factory.mktemp("first-use")
    config = (demo_shop / "pipeline.toml").read_text()
    assert ENCODE in config and "n = 10\n" in config
    shop = SimpleNamespace(dir=root, config=demo_shop / "pipeline.toml", broken=demo_shop / "first-use-broken.toml",
                           top3=demo_shop / "first-use-top3.toml", zh=root / "thai-zh.parquet",
                           empty=root / "empty.parquet")
    # fails in warm_up on every machine (fp16 needs CUDA), after the output was prepared
    shop.broken.write_text(config.replace(ENCODE, ENCODE + 'precision = "fp16"\ndevice = "cpu"\n', 1))
    shop.top3.write_text(config.replace("n = 10\n", "n = 3\n", 1))
    pq.write_table(pa.table({"query_id": [1, 2, 3], "query": ["无线电钻", "锤子", "สว่านไร้สาย"]}),  # Chinese, Thai
                   shop.zh)
    pq.write_table(pa.table({"query_id": pa.array([], pa.int64()), "query": pa.array([], pa.string())}), shop.empty)
    return shop


@pytest.fixture(scope="module")
def failed_then_corrected(shop):
    """A start that fails before any query ran, then the corrected command (another config) into
    the same output: what issue 15 item 1 reported as refused."""
    out = shop.dir / "out" / "candidates.parquet"
    failed = [funnel("run", shop.broken, "-q", shop.zh, "-o", target, "--quiet")
              for target in (out, shop.dir / "out-folder")]
    left = sorted(p.name for p in shop.dir.rglob("*") if p.relative_to(shop.dir).parts[0].startswith("out"))
    corrected = funnel("run", shop.config, "-q", shop.zh, "-o", out, "--quiet")
    return failed, left, corrected, out


def test_a_failed_start_leaves_nothing_and_the_corrected_command_runs(failed_then_corrected):
    failed, left, corrected, out = failed_then_corrected
    for proc in failed:
        line = one_error_line(proc, 2)
        assert "precision" in line and "fp16" in line
    assert left == ["out"], f"a run that wrote no unit left {left}"  # only the parent folder the user named
    assert corrected.returncode == 0, corrected.stderr
    assert "does not match" not in corrected.stderr and pq.read_metadata(out).num_rows == 30


def test_a_refused_resume_names_the_stage_and_parameter_that_changed(shop, tmp_path):
    """After a unit was written the old output is kept, and the refusal says what changed."""
    from pipeline.config import load_config
    from pipeline.runner import run_to_parquet

    queries = shop.config.parent / "data" / "queries.parquet"
    out = tmp_path / "out"
    pipe = load_config(shop.config).build()

    class Stop(Exception):
        pass

    batches = []

    def stop_at_third_batch(step, table):
        if step == 0:
            batches.append(table.num_rows)
            if len(batches) == 3:
                raise Stop

    with pytest.raises(Stop):
        run_to_parquet(pipe, queries, out, batch_size=4, shard_rows=4, progress=False, observer=stop_at_third_batch)
    assert (out / MANIFEST_NAME).exists()
    proc = funnel("run", shop.top3, "-q", queries, "-o", out, "--quiet")
    line = one_error_line(proc, 2)
    assert "holds an unfinished run that does not match this one: the pipeline config changed " \
           "(stage 7 display.topn: n 10 -> 3)" in line, line
    assert "config hash" not in line and (out / MANIFEST_NAME).exists()


def test_text_the_model_cannot_read_is_warned_about(failed_then_corrected):
    corrected = failed_then_corrected[2]
    warnings = [line for line in corrected.stderr.splitlines() if line.startswith("funnel: warning:")]
    assert len(warnings) == 1 and "are unknown to model 'all-MiniLM-L6-v2'" in warnings[0], corrected.stderr


def test_quiet_is_quiet_and_throughput_leaves_loading_out(failed_then_corrected):
    corrected = failed_then_corrected[2]
    assert "Loading weights" not in corrected.stderr and "%|" not in corrected.stderr, corrected.stderr
    summary = corrected.stdout.splitlines()[0]
    assert summary.startswith("wrote 30 rows for 3 queries") and "(loading " in summary
    assert "then 3 queries in " in summary and " queries/s" in summary, summary


def test_empty_queries_are_warned_about_before_anything_loads(shop, tmp_path):
    out = tmp_path / "empty.parquet"
    proc = funnel("run", shop.config, "-q", shop.empty, "-o", out)  # not quiet
    assert proc.returncode == 0, proc.stderr
    expected = "funnel: warning: " + EMPTY_INPUT.format(queries=shop.empty)
    assert proc.stderr.splitlines()[0] == expected, proc.stderr
    assert "Loading weights" not in proc.stderr and "queries:" not in proc.stderr  # no model, no empty bar
    assert pq.read_metadata(out).num_rows == 0 and "no query to run" in proc.stdout


@pytest.mark.parametrize("args, status, expected", [
    (["run", "{config}", "-q", "{empty}"], 2,
     "funnel: error: funnel run: Missing option '--out' / '-o'. (see 'funnel run --help')"),
    (["run", "{config}", "-q", "{empty}", "-o", "x", "--top", "0"], 2,
     "funnel: error: funnel run: Invalid value for '--top': 0 is not in the range x>=1."),
    (["--no-such-option"], 2, "funnel: error: funnel: No such option '--no-such-option'."),
    (["run", "{config}", "-q", "{zh}", "-o", "/proc/funnel-out.parquet"], 2,
     "funnel: error: cannot write the output /proc/funnel-out.parquet:"),
])
def test_every_failure_is_one_line(shop, args, status, expected):
    line = one_error_line(funnel(*[a.format(config=shop.config, zh=shop.zh, empty=shop.empty) for a in args]), status)
    assert line.startswith(expected), line


def test_debug_shows_the_traceback(shop):
    proc = funnel("--debug", "run", shop.config, "-q", shop.zh, "-o", "/proc/x.parquet")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "DataError" in proc.stderr, proc.stderr


def test_a_missing_extra_is_named_before_any_work(shop, tmp_path):
    out = tmp_path / "ray-out"
    proc = funnel("run", shop.config, "-q", shop.zh, "-o", out, "--engine", "ray",
                  prelude="import sys; sys.modules['ray'] = None  # as if ray were not installed")
    line = one_error_line(proc, 2)
    assert line.startswith("funnel: error: --engine ray needs ray, ray.data, which are not installed (extra 'ray'): "
                           "pip install ") and '[ray]"' in line, line
    assert not out.exists()


def test_build_says_what_it_encodes_before_it_starts_and_labels_the_bar(tmp_path):
    pq.write_table(pa.table({"item_id": list(range(20)), "title": [f"cordless drill model {i}" for i in range(20)]}),
                   tmp_path / "catalog.parquet")
    (tmp_path / "tiny.toml").write_text(
        '[pipeline]\nname = "tiny"\n\n[data]\ncatalog = "catalog.parquet"\n\n'
        '[[stages]]\ntype = "encode.sentence_transformers"\n\n'
        '[[stages]]\ntype = "recall.faiss"\n\n[stages.params]\nindex = "artifacts/index"\nfactory = "Flat"\n'
        'item_text = ["title"]\n')
    proc = funnel("build", tmp_path / "tiny.toml")
    assert proc.returncode == 0, proc.stderr
    announced, done = proc.stdout.splitlines()
    assert announced == (f"recall.faiss: encoding 20 catalog items (title) with all-MiniLM-L6-v2 for the index "
                         f"{tmp_path / 'artifacts' / 'index'} ...")
    assert done.startswith("recall.faiss: indexed 20 items")
    bar = proc.stderr.replace("\r", "\n")
    assert "recall.faiss artifacts/index: encoding items: 100%" in bar and "20/20" in bar and "Batches" not in bar
