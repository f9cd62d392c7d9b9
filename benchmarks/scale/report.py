"""Scale report of the recommendation recipe (issue 20): build time, peak memory and run speed
as the shop grows, on synthetic logs from ``generate.py``.

    python benchmarks/scale/report.py                                   # 20k, 200k, 1M users
    python benchmarks/scale/report.py --size 20000:12000 --size 200000:60000 --run-users 100000

For each size (``users:items``) it generates the logs in ``--workdir`` (kept, reused), copies
``pipeline.toml`` next to them, times ``funnel build`` and ``funnel run`` (over all users, or the
first ``--run-users``) as child processes and reads each one's peak resident memory from the
kernel (``os.wait4``). Results are merged into ``OUT/report.json`` (with the machine's
fingerprint; sizes already there are skipped unless ``--again``), ``OUT/report.md`` and
``OUT/scale.png`` (time and peak memory against users).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
DEFAULT_SIZES = ("20000:12000", "200000:60000", "1000000:100000")


def timed(cmd: list[str], cwd: Path, log: Path) -> dict:
    """Run ``cmd``; its wall time, peak RSS (GB, from the kernel) and exit status."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    peak = usage.ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_gb": round(peak, 2),
            "exit": os.waitstatus_to_exitcode(status)}


def measure(users: int, items: int, workdir: Path, run_users: int | None) -> dict:
    folder = workdir / f"{users}-{items}"
    if not (folder / "logs.parquet").exists():
        subprocess.run([sys.executable, str(HERE / "generate.py"), "--users", str(users), "--items", str(items),
                        "--out", str(folder)], check=True)
    shutil.copy(HERE / "pipeline.toml", folder / "pipeline.toml")
    items_column = pq.read_table(folder / "logs.parquet", columns=["items"]).column("items")
    interactions = sum(len(chunk.values) for chunk in items_column.chunks)
    build = timed(["funnel", "build", "pipeline.toml", "--force", "--quiet"], folder, folder / "build.log")
    queries = folder / "users.parquet"
    if run_users is not None and run_users < users:
        queries = folder / f"users-{run_users}.parquet"
        pq.write_table(pq.read_table(folder / "users.parquet").slice(0, run_users), queries, row_group_size=50_000)
    served = min(users, run_users or users)
    run = timed(["funnel", "run", "pipeline.toml", "--queries", queries.name, "--out", "recs", "--overwrite", "--quiet"],
                folder, folder / "run.log") if build["exit"] == 0 else {"seconds": None, "peak_gb": None, "exit": None}
    manifest = folder / "artifacts" / "v1" / "ranker" / "manifest.json"
    train = json.loads(manifest.read_text()) if manifest.exists() else {}
    return {"users": users, "items": items, "interactions": int(interactions), "build": build,
            "run": {**run, "users": served, "users_per_s": round(served / run["seconds"], 1) if run["seconds"] else None},
            "ranker": {k: train.get(k) for k in ("train_queries", "train_rows", "best_iteration", "valid_ndcg@10")}}


def write_report(out: Path, report: dict) -> None:
    rows = sorted(report["sizes"], key=lambda r: r["users"])
    lines = ["# Scale report: recommendation recipe (benchmarks/scale/pipeline.toml)", "",
             f"Machine: {report['machine'].get('cpu')}, {report['machine'].get('cores')} cores, "
             f"{report['machine'].get('memory_gb')} GB; {report['machine'].get('date')}. {report.get('note', '')}", "",
             "| users | items | interactions | build | build peak | training queries / rows | run users | run | run peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, u, k = r["build"], r["run"], r["ranker"]
        lines.append(f"| {r['users']:,} | {r['items']:,} | {r['interactions']:,} | {b['seconds']} s | {b['peak_gb']} GB | "
                     f"{k.get('train_queries')} / {k.get('train_rows')} | {u['users']:,} | {u['seconds']} s "
                     f"({u['users_per_s']} users/s) | {u['peak_gb']} GB |")
    if report.get("steps"):
        lines += ["", "Single steps measured on their own (`/usr/bin/time -v`, or timed in one process):", "",
                  "| step | users | interactions | result | wall | peak |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['users']:,} | {r['interactions']:,} | {r['result']} | {r['seconds']} s | "
                  + (f"{r['peak_gb']} GB |" if r.get("peak_gb") is not None else "- |") for r in report["steps"]]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    users = [r["users"] for r in rows]
    run_all = [(r["run"]["seconds"] or 0) / 60 * r["users"] / r["run"]["users"] for r in rows]
    plot_time_memory(out / "scale.png", users, "users", rows,
                     ("funnel run, all users (extrapolated from the users run)", run_all))


def plot_time_memory(path: Path, xs: list[int], xlabel: str, rows: list[dict],
                     run_time: tuple[str, list[float]] | None = None) -> None:
    """Two panels against ``xs`` (log scale): build (and ``run_time``) minutes, build and run peak GB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(xs, [r["build"]["seconds"] / 60 for r in rows], "o-", label="funnel build")
    if run_time is not None:
        left.plot(xs, run_time[1], "s-", label=run_time[0])
    left.set(xscale="log", xlabel=xlabel, ylabel="minutes", title="time")
    right.plot(xs, [r["build"]["peak_gb"] for r in rows], "o-", label="funnel build")
    right.plot(xs, [r["run"]["peak_gb"] or 0 for r in rows], "s-", label="funnel run")
    right.set(xscale="log", xlabel=xlabel, ylabel="peak resident memory (GB)", title="memory")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)

@click.command()
@click.option("--size", "sizes", multiple=True, default=DEFAULT_SIZES, show_default=True, help="users:items, repeatable.")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("/tmp/funnel-scale"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Results folder (default benchmarks/results/<date>-<machine>/scale).")
@click.option("--run-users", type=click.IntRange(min=1), help="Time `funnel run` on the first N users only.")
@click.option("--again", is_flag=True, help="Measure sizes already in OUT/report.json again.")
@click.option("--note", default="", help="A sentence for the report (e.g. the machine's load).")
def main(sizes, workdir: Path, out: Path | None, run_users: int | None, again: bool, note: str) -> None:
    """Measure build and run at each size and write report.json/md and scale.png."""
    from pipeline.bench import fingerprint

    machine = fingerprint()
    out = out or HERE.parent / "results" / f"{machine['date']}-{machine['id']}" / "scale"
    out.mkdir(parents=True, exist_ok=True)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {"sizes": []}
    report["machine"], report["note"] = machine, note or report.get("note", "")
    for size in sizes:
        users, items = (int(x) for x in size.split(":"))
        if not again and any(r["users"] == users and r["items"] == items for r in report["sizes"]):
            continue
        result = measure(users, items, workdir, run_users)
        click.echo(json.dumps(result))
        report["sizes"] = [r for r in report["sizes"] if (r["users"], r["items"]) != (users, items)] + [result]
        write_report(out, report)


if __name__ == "__main__":
    main()
