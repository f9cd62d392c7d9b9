"""The encoder against bare fp32 ``SentenceTransformer.encode``: texts per second and cosine."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from ..stage import Pipeline, Stage
from .timing import clone_warm, median, progress_bar

__all__ = ["texts_for_encoder", "encoder_bench"]


def texts_for_encoder(cfg, pipe: Pipeline, queries: pa.Table, encoder: Stage, n: int, seed: int) -> dict[str, list[str]]:
    out = {}
    if encoder.text_column in queries.column_names:
        out["queries"] = [t for t in queries.column(encoder.text_column).to_pylist()[:n] if t]
    recall = next((s for s in pipe.stages if s.name == "recall.faiss"), None)
    if recall is not None and "catalog" in cfg.data and cfg.data_path("catalog").exists():
        from ..data import read_catalog
        from stages.faiss import _item_texts

        catalog = read_catalog(cfg.data_path("catalog"), list(recall.item_text))
        rows = np.random.default_rng(seed).permutation(catalog.num_rows)[:n]
        out["items"] = [t for t in _item_texts(catalog.take(pa.array(np.sort(rows))), recall.item_text) if t]
    return out


def encoder_bench(encoder: Stage, texts: dict[str, list[str]], repeats: int, sweep: bool, progress: bool) -> dict:
    """The Funnel encoder (as configured, and in bf16 when on CPU) against bare fp32
    ``SentenceTransformer.encode`` with its defaults, interleaved, on the same texts."""
    import torch
    from sentence_transformers import SentenceTransformer

    from stages.sentence_transformers import resolve_model

    path, _ = resolve_model(encoder.model)
    bare = SentenceTransformer(path, device=encoder.device_)
    bare.eval()
    compiled = ", compiled" if getattr(encoder, "compile", False) else ""
    variants = {f"configured ({encoder.precision_}, batch {encoder.batch_size}{compiled})": encoder}
    fast = "bf16" if encoder.device_ == "cpu" else "fp16"
    fast_encoder = encoder
    if encoder.precision_ != fast:  # its own model: on CPU bf16 is a conversion of the weights, not a context
        fast_encoder = encoder.clone(precision=fast)
        fast_encoder.warm_up()
    for bs in sorted({encoder.batch_size, 256} | ({32, 64, 128} if sweep else set())):
        if (fast, bs) != (encoder.precision_, encoder.batch_size):
            variants[f"{fast}, batch {bs}{compiled}"] = clone_warm(fast_encoder, batch_size=bs)
    report = {"bare": f"SentenceTransformer.encode fp32 (batch_size 32, normalize_embeddings={encoder.normalize})",
              "device": encoder.device_, "torch_threads": torch.get_num_threads(), "sets": {}}
    runs = max(1, min(repeats, 3))
    with progress_bar(len(texts) * runs * (len(variants) + 1), "encoder", progress) as bar:
        for name, items in texts.items():
            if not items:
                continue
            bare.encode(items[:64], normalize_embeddings=encoder.normalize)
            for v in variants.values():
                v.encode_texts(items[:64])
            times: dict[str, list[float]] = {}
            cpu: dict[str, list[float]] = {}
            outs: dict[str, np.ndarray] = {}
            order = ["bare", *variants]
            for r in range(runs):
                for who in (order if r % 2 == 0 else order[::-1]):
                    c0, t0 = time.process_time(), time.perf_counter()
                    if who == "bare":
                        outs[who] = bare.encode(items, normalize_embeddings=encoder.normalize)
                    else:
                        outs[who] = variants[who].encode_texts(items)
                    times.setdefault(who, []).append(time.perf_counter() - t0)
                    cpu.setdefault(who, []).append(time.process_time() - c0)
                    bar.update()
            ref = outs["bare"] / np.linalg.norm(outs["bare"], axis=1, keepdims=True)
            base, base_cpu = median(times["bare"]), median(cpu["bare"])
            entry = {"texts": len(items), "bare_fp32_texts_per_s": len(items) / base, "variants": {}}
            for who in variants:
                got = outs[who] / np.linalg.norm(outs[who], axis=1, keepdims=True)
                cos = (got * ref).sum(axis=1)
                t = median(times[who])
                entry["variants"][who] = {"texts_per_s": len(items) / t, "speedup": base / t,
                                          "speedup_cpu_time": base_cpu / max(median(cpu[who]), 1e-9),
                                          "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}
            report["sets"][name] = entry
    return report
