"""The example plug-in (``examples/plugin``), installed as a third party installs it.

Its stages are found through the ``funnel.stages`` entry point, pass Funnel's conformance kit
(``StageCase`` + ``parametrize_with_checks``, exactly as a plug-in's own tests use it), show up
in ``funnel stages list/show``, and run end to end from a config that names them by registry
key: the demo shop's pipeline with ``features.price_band`` after the catalog lookup and
``filter.brand_quota`` between the ranker and display, through ``funnel run``.

Skipped, with the reason, when the plug-in is not installed (``pip install -e examples/plugin``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomli_w
from click.testing import CliRunner

from pipeline import available_stages, get_stage_class
from pipeline.cli import main
from pipeline.testing import StageCase, parametrize_with_checks

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "examples" / "plugin"
KEYS = ("filter.brand_quota", "features.price_band")

plugin = pytest.importorskip(
    "funnel_example_plugin",
    reason="the example plug-in is not installed; run `pip install -e examples/plugin` to test it")
if not set(KEYS) <= set(available_stages()):
    pytest.skip(f"funnel_example_plugin imports but its entry points {KEYS} are not registered; "
                "reinstall it with `pip install -e examples/plugin`", allow_module_level=True)

EDGES = [25.0, 100.0, 250.0, 500.0]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ranked_candidates() -> pa.Table:
    """Four queries' candidates after a ranker, with brands and prices as the catalog lookup gives them."""
    rng = np.random.default_rng(7)
    n_per = [6, 9, 1, 8]
    qids = np.repeat(np.arange(len(n_per)), n_per)
    n = len(qids)
    brands = rng.choice(["acme", "bolt", "crux", None], size=n).tolist()
    prices = rng.uniform(1, 800, size=n).round(2).tolist()
    prices[3] = None
    scores = rng.normal(size=n).astype(np.float32)
    ranks = np.concatenate([np.argsort(np.argsort(-scores[qids == q])) + 1 for q in range(len(n_per))])
    return pa.table({
        "query_id": pa.array(qids.astype(np.int64)),
        "item_id": pa.array([f"item{i}" for i in range(n)]),
        "brand": pa.array(brands, pa.string()),
        "price": pa.array(prices, pa.float64()),
        "score": pa.array(scores),
        "rank": pa.array(ranks.astype(np.int32)),
    })


@parametrize_with_checks([
    StageCase(get_stage_class("filter.brand_quota")(per_brand=1), ranked_candidates()),
    StageCase(get_stage_class("filter.brand_quota")(per_brand=3, brand_column="brand"), ranked_candidates(),
              id="filter.brand_quota-3"),
    StageCase(get_stage_class("features.price_band")(edges=EDGES, output_column="f_price_band"), ranked_candidates()),
])
def test_plugin_stage_conforms(case, check):
    check(case)


def test_entry_points_resolve_to_the_plugin_classes():
    assert get_stage_class("filter.brand_quota") is plugin.BrandQuotaFilter
    assert get_stage_class("features.price_band") is plugin.PriceBandFeature


def test_stages_list_and_show_describe_the_plugin():
    result = invoke("stages", "list")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines()[2:] if line and not line.startswith(" ")}
    for key in KEYS:
        assert f"funnel-example-plugin  {plugin.__version__}" in rows[key], rows[key]
    assert "cpu,cuda" in rows["features.price_band"] and "price_band" in rows["features.price_band"]
    result = invoke("stages", "show", "filter.brand_quota")
    assert result.exit_code == 0, result.output
    assert "per_brand     int  default 2" in result.output
    assert "candidates kept per (query, brand); an int >= 1." in result.output
    assert "query_id: any" in result.output and "rank: int32" in result.output


def _with_plugin_stages(shop: Path, name: str, per_brand: int) -> Path:
    """The demo shop's pipeline.toml with the plug-in's stages inserted, saved beside it."""
    doc = tomllib.loads((shop / "pipeline.toml").read_text())
    stages = doc["stages"]
    after_lookup = [s["type"] for s in stages].index("lookup.catalog") + 1
    stages.insert(after_lookup, {"type": "features.price_band", "params": {"edges": EDGES}})
    before_display = [s["type"] for s in stages].index("display.topn")
    stages.insert(before_display, {"type": "filter.brand_quota", "params": {"per_brand": per_brand}})
    config = shop / name
    config.write_text(tomli_w.dumps(doc))
    return config


def test_plugin_stages_run_end_to_end_from_a_config(demo_shop, tmp_path):
    queries = tmp_path / "queries.parquet"
    pq.write_table(pq.read_table(demo_shop / "data" / "queries.parquet").slice(0, 40), queries)
    config = _with_plugin_stages(demo_shop, "with_example_plugin.toml", per_brand=1)

    checked = invoke("config", "check", config)
    assert checked.exit_code == 0, checked.output
    assert 'type = "filter.brand_quota"' in checked.output and "per_brand = 1" in checked.output

    plain = invoke("run", demo_shop / "pipeline.toml", "--queries", queries, "--out", tmp_path / "plain.parquet", "--quiet")
    assert plain.exit_code == 0, plain.output
    result = invoke("run", config, "--queries", queries, "--out", tmp_path / "out.parquet", "--quiet")
    assert result.exit_code == 0, result.output
    assert "filter.brand_quota" in result.output and "features.price_band" in result.output  # per-stage table

    def brand_counts(path):
        table = pq.read_table(path)
        return table, Counter((q, b) for q, b in zip(table.column("query_id").to_pylist(),
                                                     table.column("brand").to_pylist()) if b is not None)

    _, before = brand_counts(tmp_path / "plain.parquet")
    out, after = brand_counts(tmp_path / "out.parquet")
    assert max(before.values()) > 1, "the demo's top-10 never repeats a brand; the quota would prove nothing"
    assert max(after.values()) == 1, [k for k, v in after.items() if v > 1]
    assert set(out.column("query_id").to_pylist()) == set(pq.read_table(queries).column("query_id").to_pylist())
    prices = out.column("price").to_numpy(zero_copy_only=False)
    expected = np.where(np.isnan(prices), -1, np.searchsorted(EDGES, prices, side="right"))
    got = np.array([-1 if b is None else b for b in out.column("price_band").to_pylist()])
    np.testing.assert_array_equal(got, expected)


def test_config_naming_an_uninstalled_plugin_stage_says_so(tmp_path):
    config = tmp_path / "p.toml"
    config.write_text('[[stages]]\ntype = "filter.brand_quotas"\n')
    result = invoke("config", "check", config)
    assert result.exit_code == 2
    assert "unknown stage type 'filter.brand_quotas'; known types:" in result.output
    assert "Did you mean 'filter.brand_quota'?" in result.output


@pytest.mark.slow
def test_the_plugins_own_test_suite_passes():
    """The plug-in's tests, run from its folder with its own pytest config, as its author would."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=PLUGIN, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
