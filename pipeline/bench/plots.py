"""The report's PNG plots: latency per stage, and the Pareto plots of the sweeps and the ANN comparison
(none when matplotlib is not installed)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plots"]


def plots(report: dict, out: Path) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    stages = report["stages"]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(stages) + 1.5))
    names = [f"{s['step']}. {s['name']}" for s in stages][::-1]
    p50 = [s["p50_ms"] or 0 for s in stages][::-1]
    p95 = [s["p95_ms"] or 0 for s in stages][::-1]
    ax.barh(names, p95, color="#c6dbef", label="p95")
    ax.barh(names, p50, color="#2171b5", label="p50")
    ax.set_xlabel(f"ms per batch of {report['end_to_end']['batch_size']} queries")
    ax.set_title(f"{report['config_name']}: latency per stage ({report['fingerprint']['id']})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "stages.png", dpi=110)
    plt.close(fig)
    files.append("stages.png")

    def pareto_plot(sweep: dict, quality: str, filename: str, title: str, group: str = "family") -> None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        groups: dict[str, list[dict]] = {}
        for p in sweep["points"]:
            groups.setdefault(str(p.get(group)), []).append(p)
        for name, pts in groups.items():
            pts = sorted(pts, key=lambda p: p["ms_per_query"])
            ax.plot([p["ms_per_query"] for p in pts], [p.get(quality) for p in pts], "o-", ms=4, alpha=0.7, label=name)
        front = sweep["pareto"]
        if front:
            ax.plot([p["ms_per_query"] for p in front], [p[quality] for p in front], "k--", lw=1, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("ms per query (batch throughput)")
        ax.set_ylabel(quality.replace("_at_", "@"))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)
        files.append(filename)

    sweeps = report.get("sweeps") or {}
    for i, s in enumerate(sweeps.get("index", [])):
        pareto_plot(s, "recall_at_k", f"sweep_index_{i + 1}.png", f"{s['stage']}: {s['quality']} vs time, "
                    f"{s['vectors']} vectors")
    pipe = sweeps.get("pipeline")
    if pipe and pipe["points"] and pipe["quality"]:
        pareto_plot(pipe, pipe["quality"], "sweep_pipeline.png", "whole pipeline: quality vs time", group="param")
    sizes = sweeps.get("batch_size")
    if sizes:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p["batch_size"] for p in sizes], [p["queries_per_s"] for p in sizes], "o-")
        ax.set_xscale("log")
        ax.set_xlabel("batch size (queries)")
        ax.set_ylabel("queries per second")
        ax.set_title("whole pipeline: throughput vs batch size")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "sweep_batch_size.png", dpi=110)
        plt.close(fig)
        files.append("sweep_batch_size.png")
    if report.get("ann"):
        a = report["ann"]
        pareto_plot(a, "recall_at_k", "ann_synthetic.png", f"synthetic {a['vectors']} x {a['dim']}: {a['quality']} vs time")
    return files
