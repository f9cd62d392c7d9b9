"""The report files: JSON-safe values for ``report.json`` and the tables of ``report.md``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["jsonable", "markdown"]


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else round(float(value), 6)
    if isinstance(value, Path):
        return str(value)
    return value


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2g}"
    return str(v)


def markdown(r: dict) -> str:
    fp, e = r["fingerprint"], r["end_to_end"]
    lines = [f"# funnel bench: {r['config_name']}", "",
             f"Config `{r['config']}`, {e['queries']} queries from `{r['queries']}`, batches of {e['batch_size']}, "
             f"{r['warmup']} warm-up + {r['repeats']} timed passes"
             + (f"; parameters replaced: `{json.dumps(r['overrides'])}`" if r.get("overrides") else "") + ".", "",
             f"Machine `{fp['id']}`: {fp['cpu']}, {fp['cores']} cores ({', '.join(fp['cpu_flags'])}), "
             f"{fp['memory_gb']} GB; GPU: {fp['gpu']['name'] + ' (driver ' + str(fp['gpu'].get('driver')) + ')' if fp['gpu'] else 'none'}; "
             f"threads {fp['threads']}; load average {r['load_average']['start']} at start, "
             f"{r['load_average']['end']} at end; {fp['date']}.", "",
             "Libraries: " + ", ".join(f"{k} {v}" for k, v in fp["libraries"].items()), "",
             "## End to end", "",
             "| queries/s | p50 ms/batch | p95 | p99 | p50 ms/query | 1 query alone p50 ms | peak RSS MB |",
             "|---:|---:|---:|---:|---:|---:|---:|",
             f"| {_fmt(e['queries_per_s'], 1)} | {_fmt(e['p50_ms'])} | {_fmt(e['p95_ms'])} | {_fmt(e['p99_ms'])} | "
             f"{_fmt(e['p50_ms_per_query'], 3)} | {_fmt(e['single_query'].get('funnel_p50_ms'))} | {_fmt(e['peak_rss_mb'], 0)} |", ""]
    if e.get("quality"):
        lines += ["Quality of the final output: " + ", ".join(f"{k} {_fmt(v, 4)}" for k, v in e["quality"].items()), ""]
    lines += ["## Stages", "",
              "| step | stage | device | rows in | rows out | p50 ms | p95 ms | p99 ms | p50 ms/query | rows/s | share | "
              "bare p50 ms | Funnel/bare | recall@k | ANN recall@k |",
              "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in r["stages"]:
        rec = f"{_fmt(s.get('recall_at_k'), 3)} @{s['k']}" if s.get("recall_at_k") is not None else "–"
        ann = f"{_fmt(s.get('ann_recall_at_k'), 3)} @{s['ann_k']}" if s.get("ann_recall_at_k") is not None else "–"
        lines.append(f"| {s['step']} | {s['name']} | {s['device']} | {s['rows_in']} | {s['rows_out']} | {_fmt(s['p50_ms'])} | "
                     f"{_fmt(s['p95_ms'])} | {_fmt(s['p99_ms'])} | {_fmt(s['p50_ms_per_query'], 3)} | "
                     f"{_fmt(s['throughput_rows_per_s'], 0)} | {_fmt(s['share_of_time'])} | {_fmt(s.get('bare_p50_ms'))} | "
                     f"{_fmt(s.get('overhead_ratio'), 3)} | {rec} | {ann} |")
    lines += ["", "![stages](stages.png)", ""]
    o = r.get("overhead")
    if o:
        lines += ["## Overhead against the bare libraries", ""]
        if o.get("skipped"):
            lines += [f"Not measured: {o['skipped']}", ""]
        else:
            sq = e["single_query"]
            lines += [f"`{o['bare_script']}` does the same work with sentence-transformers, faiss, Polars and LightGBM; "
                      "both ran in this process, interleaved batch by batch.", "",
                      "| | Funnel s/pass | bare s/pass | overhead_ratio | paired median ratio | CPU-time ratio | same top-N lists |",
                      "|---|---:|---:|---:|---:|---:|---:|",
                      f"| batches of {e['batch_size']} | {_fmt(o['funnel_s_per_pass'], 3)} | {_fmt(o['bare_s_per_pass'], 3)} | "
                      f"**{_fmt(o['overhead_ratio'], 3)}** | {_fmt(o['paired_median_ratio'], 3)} | {_fmt(o['cpu_overhead_ratio'], 3)} | "
                      f"{_fmt(o['agreement'], 3)} |",
                      f"| one query alone (p50 ms) | {_fmt(sq.get('funnel_p50_ms'))} | {_fmt(sq.get('bare_p50_ms'))} | "
                      f"{_fmt(sq.get('overhead_ratio_p50'), 3)} | | | |", "",
                      f"Stages after the encoder only (Funnel seconds / bare seconds): "
                      f"**{_fmt(o.get('overhead_ratio_after_encoder'), 3)}**. The encoder itself is compared below.", ""]
    enc = r.get("encoder")
    if enc:
        lines += ["## Encoder against bare sentence-transformers", "", f"Baseline: {enc['bare']} on {enc['device']}, "
                  f"{enc['torch_threads']} torch threads.", "",
                  "| texts | n | bare fp32 texts/s | Funnel variant | texts/s | speed-up | speed-up (CPU time) | cosine min | cosine mean |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for name, s in enc["sets"].items():
            for vname, v in s["variants"].items():
                lines.append(f"| {name} | {s['texts']} | {_fmt(s['bare_fp32_texts_per_s'], 0)} | {vname} | {_fmt(v['texts_per_s'], 0)} | "
                             f"**{_fmt(v['speedup'])}x** | {_fmt(v['speedup_cpu_time'])}x | {v['cosine_min']:.5f} | {v['cosine_mean']:.6f} |")
        lines.append("")
    sweeps = r.get("sweeps") or {}
    for i, s in enumerate(sweeps.get("index", [])):
        lines += [f"## Sweep: {s['stage']} index types and search parameters", "",
                  f"{s['vectors']} vectors x {s['dim']}, {s['queries']} queries, {s['quality']}; builds (s): "
                  + ", ".join(f"{k} {_fmt(v, 1)}" for k, v in s["build_s"].items()) + (f". {s['note']}" if s.get("note") else ""), "",
                  "Pareto front:", "", "| family | param | value | recall | ms/query | queries/s |", "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {p['family']} | {p['param'] or ''} | {_fmt(p['value'])} | {p['recall_at_k']:.4f} | "
                  f"{_fmt(p['ms_per_query'], 4)} | {_fmt(p['queries_per_s'], 0)} |" for p in s["pareto"]]
        lines += ["", "Fastest point of each family with recall >= 0.95:", "",
                  "| family | param | value | recall | queries/s |", "|---|---|---:|---:|---:|"]
        lines += [f"| {fam} | {p['param'] or ''} | {_fmt(p['value'])} | {p['recall_at_k']:.4f} | {_fmt(p['queries_per_s'], 0)} |"
                  if p else f"| {fam} | none reached 0.95 | | | |" for fam, p in s.get("best_at_recall_0.95", {}).items()]
        lines += ["", f"![index sweep](sweep_index_{i + 1}.png)", ""]
    pipe = sweeps.get("pipeline")
    if pipe and pipe["points"]:
        q = pipe["quality"]
        lines += ["## Sweep: whole pipeline", "", f"First {pipe.get('queries')} queries; passes timed in interleaved rounds.", "",
                  "| param | value | k | ms/query | queries/s | NDCG@10 | "
                  + (q.replace("_at_", "@") if q else "") + " | Pareto |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        front = {(p["param"], p["value"]) for p in pipe["pareto"]}
        lines += [f"| {p['param']} | {p['value']} | {p['k']} | {_fmt(p['ms_per_query'], 3)} | {_fmt(p['queries_per_s'], 0)} | "
                  f"{_fmt(p.get('ndcg_at_10'), 4)} | {_fmt(p.get(q), 4) if q else ''} | {'yes' if (p['param'], p['value']) in front else ''} |"
                  for p in pipe["points"]]
        lines += ["", "![pipeline sweep](sweep_pipeline.png)", ""]
    if sweeps.get("batch_size"):
        lines += ["## Sweep: batch size", "", "| batch size | queries | queries/s | p50 ms/batch | p99 ms/batch | p50 ms/query |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {p['batch_size']} | {p['queries']} | {_fmt(p['queries_per_s'], 1)} | {_fmt(p['p50_ms'])} | "
                  f"{_fmt(p['p99_ms'])} | {_fmt(p['p50_ms_per_query'], 3)} |" for p in sweeps["batch_size"]]
        lines += ["", "![batch size](sweep_batch_size.png)", ""]
    a = r.get("ann")
    if a:
        lines += [f"## ANN on synthetic vectors ({a['vectors']} x {a['dim']})", "", f"{a['generator']}; {a['queries']} queries, "
                  f"{a['quality']}. Builds (s): " + ", ".join(f"{k} {_fmt(v, 1)}" for k, v in a["build_s"].items())
                  + (f". {a['note']}" if a.get("note") else ""), "",
                  "Fastest point with recall@10 >= 0.95:", "", "| | family | param | recall | queries/s |", "|---|---|---|---:|---:|"]
        for name, p in a["best_at_recall_0.95"].items():
            lines.append(f"| {name} | {p['family']} | {p['param']}={p['value']} | {p['recall_at_k']:.4f} | {_fmt(p['queries_per_s'], 0)} |"
                         if p else f"| {name} | none reached 0.95 | | | |")
        lines += ["", f"Funnel / hnswlib queries/s at recall >= 0.95: **{_fmt(a['funnel_over_hnswlib_qps_at_0.95'], 2)}**", "",
                  "![ann](ann_synthetic.png)", ""]
    return "\n".join(lines)
