"""Scale report of the search recipe (issue 20): `funnel build` time and peak memory as the
catalog grows, on catalogs from ``generate_catalog.py`` (titles recombined from Home Depot's).

    python benchmarks/scale/report_search.py --products 5000                 # a quick check
    python benchmarks/scale/report_search.py --products 100000 --products 1000000

For each size it generates the catalog and queries in ``--workdir`` (kept, reused), copies
``search.toml`` next to them, times ``funnel build`` (and ``funnel run`` over ``--run-queries``
queries unless 0) as child processes and reads each one's peak resident memory from the kernel
(``os.wait4``). The dense index's manifest says which factory ``"auto"`` chose. Results are
merged into ``OUT/report-search.json`` (with the machine's fingerprint; sizes already there are
skipped unless ``--again``), ``OUT/report-search.md`` and ``OUT/search.png``.

Encoding dominates the build: all-MiniLM-L6-v2 encodes a few hundred short titles per second
on two CPU cores, so a million products is hours there and minutes on a GPU.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import plot_time_memory, timed  # noqa: E402  (the recommendation report's timer and plot)


def measure(products: int, workdir: Path, run_queries: int, source: Path | None) -> dict:
    folder = workdir / f"search-{products}"
    if not (folder / "catalog.parquet").exists():
        cmd = [sys.executable, str(HERE / "generate_catalog.py"), "--products", str(products), "--out", str(folder)]
        subprocess.run(cmd + (["--source", str(source)] if source else []), check=True)
    shutil.copy(HERE / "search.toml", folder / "search.toml")
    build = timed(["funnel", "build", "search.toml", "--force", "--quiet"], folder, folder / "build.log")
    manifest = folder / "artifacts" / "v1" / "index" / "manifest.json"
    index = json.loads(manifest.read_text()) if manifest.exists() else {}
    encoded = re.search(r"encoded (\d+) items in ([\d.]+) s", (folder / "build.log").read_text())
    encode = {"items": int(encoded.group(1)), "seconds": float(encoded.group(2)),
              "items_per_s": round(int(encoded.group(1)) / max(float(encoded.group(2)), 1e-9), 1)} if encoded else {}
    run = {"seconds": None, "peak_gb": None, "exit": None, "queries": 0}
    if run_queries and build["exit"] == 0:
        queries = folder / f"queries-{run_queries}.parquet"
        pq.write_table(pq.read_table(folder / "queries.parquet").slice(0, run_queries), queries)
        run = timed(["funnel", "run", "search.toml", "--queries", queries.name, "--out", "out.parquet", "--overwrite",
                     "--quiet"], folder, folder / "run.log")
        run["queries"] = pq.read_metadata(queries).num_rows
    return {"products": products, "build": {**build, "products_per_s": round(products / build["seconds"], 1)},
            "encode": encode, "index": {k: index.get(k) for k in ("factory", "nprobe", "chosen_by", "count", "dim")},
            "run": {**run, "queries_per_s": round(run["queries"] / run["seconds"], 1) if run["seconds"] else None}}


def write_report(out: Path, report: dict) -> None:
    rows = sorted(report["sizes"], key=lambda r: r["products"])
    m = report["machine"]
    lines = ["# Scale report: search recipe (benchmarks/scale/search.toml)", "",
             f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gb')} GB; {m.get('date')}. "
             f"{report.get('note', '')}", "",
             "| products | dense index | build | products/s | of which encoding | build peak | run queries | run | run peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, u, i = r["build"], r["run"], r["index"]
        nprobe = f", nprobe {i['nprobe']}" if i.get("nprobe") else ""
        e = r.get("encode") or {}
        encoding = f"{e['seconds']} s ({e['items_per_s']} items/s)" if e else "-"
        lines.append(f"| {r['products']:,} | {i.get('factory')}{nprobe} | {b['seconds']} s | {b['products_per_s']} | "
                     f"{encoding} | {b['peak_gb']} GB | {u['queries']} | {u['seconds']} s ({u['queries_per_s']} q/s) | "
                     f"{u['peak_gb']} GB |")
    (out / "report-search.md").write_text("\n".join(lines) + "\n")
    (out / "report-search.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_time_memory(out / "search.png", [r["products"] for r in rows], "products", rows)

@click.command()
@click.option("--products", "sizes", type=click.IntRange(min=1), multiple=True, default=(5000,), show_default=True,
              help="Catalog size, repeatable.")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("/tmp/funnel-scale"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Results folder (default benchmarks/results/<date>-<machine>/scale).")
@click.option("--source", type=click.Path(path_type=Path), help="Home Depot catalog (generate_catalog.py's default).")
@click.option("--run-queries", type=click.IntRange(min=0), default=500, show_default=True,
              help="Time `funnel run` over this many queries (0: no run).")
@click.option("--again", is_flag=True, help="Measure sizes already in OUT/report-search.json again.")
@click.option("--note", default="", help="A sentence for the report (e.g. the machine's load).")
def main(sizes, workdir: Path, out: Path | None, source: Path | None, run_queries: int, again: bool, note: str) -> None:
    """Measure the search recipe's build (and run) at each size; write report-search.json/md and search.png."""
    from pipeline.bench import fingerprint

    machine = fingerprint()
    out = out or HERE.parent / "results" / f"{machine['date']}-{machine['id']}" / "scale"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report-search.json"
    report = json.loads(path.read_text()) if path.exists() else {"sizes": []}
    report["machine"], report["note"] = machine, note or report.get("note", "")
    for products in sizes:
        if not again and any(r["products"] == products for r in report["sizes"]):
            continue
        result = measure(products, workdir, run_queries, source)
        click.echo(json.dumps(result))
        report["sizes"] = [r for r in report["sizes"] if r["products"] != products] + [result]
        write_report(out, report)


if __name__ == "__main__":
    main()
