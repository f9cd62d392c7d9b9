"""``funnel build``: make every artifact a pipeline needs, in stage order, cached by content.

A stage that needs artifacts (an index, a trained model, a catalog snapshot) implements
``build(upstream, ctx) -> str``: ``upstream`` is the :class:`Pipeline` of the stages before it
(already built, so a ranker can run recall to collect its training candidates), ``ctx`` a
:class:`BuildContext`. It returns one line saying what it did, or ``None`` when the stage's
parameters leave it nothing to build (an encoder without a ``train`` table): nothing is printed. Builds are skipped when the
artifact's manifest records the same ``build_key`` — a hash of the stage's parameters and the
contents of its inputs — unless ``ctx.force``.

A stage may also implement ``check_build(ctx)``: it is called for every stage (sub-pipelines of
``recall.fused`` included) before anything is built, so a missing optional package or input
fails the command at once instead of after the first artifacts (an encoder that must be trained
checks for the ``train`` extra there).

A stage whose output depends on a model folder that ``funnel build`` itself may rewrite (an
encoder with a ``train`` table) exposes ``model_build_key()``; :func:`artifact_keys` adds it to
what downstream artifacts depend on, so an index or ranker is rebuilt after its encoder.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa

from .config import PipelineConfig, stage_to_spec
from .stage import Pipeline, Stage

__all__ = ["BuildContext", "artifact_keys", "build_artifacts", "find_upstream", "iter_batches", "run_batches", "upstream_key",
           "walk_stages", "available_memory", "memory_in_use", "check_fits", "format_bytes", "MEMORY_ENV"]

#: Environment variable that sets the memory a build may use (``"8GB"``, ``"512MB"``, bytes),
#: instead of what the machine reports as available; the estimates of :func:`check_fits` read it.
MEMORY_ENV = "FUNNEL_MEMORY_LIMIT"
_UNITS = {"": 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


@dataclass
class BuildContext:
    config: PipelineConfig
    force: bool = False
    progress: bool = True
    log: Callable[[str], None] = field(default=print)
    #: the pipeline being built (every stage, so a stage can find the ones after it)
    pipeline: Pipeline | None = None
    #: where build steps that run the upstream pipeline over many queries run it: "local" or
    #: "ray" (:func:`pipeline.ray_engine.run_on_ray`, with ``ray_options`` such as address, actors)
    engine: str = "local"
    ray_options: dict = field(default_factory=dict)

    def data_path(self, key: str) -> Path:
        return self.config.data_path(key)


def find_upstream(upstream: Pipeline | None, predicate: Callable[[Stage], bool]) -> Stage | None:
    """The nearest stage before this one for which ``predicate`` holds."""
    if upstream is None:
        return None
    for stage in reversed(upstream.stages):
        if predicate(stage):
            return stage
    return None


def build_artifacts(cfg: PipelineConfig, *, force: bool = False, progress: bool = True,
                    log: Callable[[str], None] = print, only: Callable[[Stage], bool] | None = None,
                    engine: str = "local", ray_options: dict | None = None) -> Pipeline:
    """Build the artifacts of every stage of ``cfg`` that has a ``build`` method; return the pipeline."""
    pipe = cfg.build()
    ctx = BuildContext(cfg, force=force, progress=progress, log=log, pipeline=pipe, engine=engine,
                       ray_options=ray_options or {})
    for stage in walk_stages(pipe.stages):
        check = getattr(stage, "check_build", None)
        if callable(check) and (only is None or only(stage)):
            check(ctx)
    for i, stage in enumerate(pipe.stages):
        if not hasattr(stage, "build") or (only is not None and not only(stage)):
            continue
        upstream = Pipeline(pipe.stages[:i], inputs=pipe.inputs) if i else None
        if (line := stage.build(upstream, ctx)) is not None:
            log(line)
    return pipe


def key_params(stage: Stage) -> dict:
    """``stage``'s parameters as build keys see them: all but its ``same_results_params``."""
    skip = set(stage.same_results_params)
    return {k: v for k, v in stage_to_spec(stage)["params"].items() if k not in skip}


def walk_stages(stages: list[Stage]):
    """Every stage of ``stages``, then of their sub-pipelines (``recall.fused`` sources), depth first."""
    for stage in stages:
        yield stage
        subs = getattr(stage, "_pipelines", None)
        if callable(subs):
            for _, _, sub in subs():
                yield from walk_stages(sub.stages)


def artifact_keys(stage: Stage) -> dict:
    """The build keys of ``stage``'s artifacts: its path parameters' manifests, a model folder
    ``funnel build`` trained (``model_build_key``), and those of its sub-pipelines' stages."""
    from .artifacts import MANIFEST

    keys = {}
    for param in stage.path_params:
        if not getattr(stage, param, None):
            continue  # an optional artifact left out (features.history with association = None)
        manifest = stage.resolve_path(getattr(stage, param)) / MANIFEST
        if manifest.exists():
            keys[param] = json.loads(manifest.read_text()).get("build_key")
    model_key = getattr(stage, "model_build_key", None)
    if callable(model_key) and (key := model_key()) is not None:
        keys["model"] = key
    subs = getattr(stage, "_pipelines", None)
    if callable(subs):
        keys["sources"] = {name: [artifact_keys(s) for s in sub.stages] for name, _, sub in subs()}
    return keys


def upstream_key(upstream: Pipeline | None) -> list:
    """What a downstream artifact depends on: each upstream stage's spec and artifact build keys."""
    return [{"spec": {"type": stage.name, "params": key_params(stage)}, "artifacts": artifact_keys(stage)}
            for stage in (upstream.stages if upstream is not None else ())]


def parse_bytes(text: str) -> int:
    """``"8GB"``, ``"512 MB"``, ``"1.5g"`` or a plain number of bytes -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*", str(text), re.IGNORECASE)
    unit = m.group(2).upper().replace("I", "") if m else None
    if unit is not None and unit and not unit.endswith("B"):
        unit += "B"
    if m is None or unit not in _UNITS:
        from .errors import ConfigError

        raise ConfigError(f"{MEMORY_ENV}={text!r} is not a size; expected bytes or a number with KB, MB, GB or TB")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (``"3.2 GB"``)."""
    for unit in ("TB", "GB", "MB", "KB"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.1f} {unit}"
    return f"{int(n)} B"


def memory_in_use() -> int:
    """Resident memory of this process in bytes (Linux ``/proc``; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def available_memory() -> int:
    """Bytes a build may still take: ``$FUNNEL_MEMORY_LIMIT`` minus what this process holds, else
    the kernel's ``MemAvailable`` (capped by a cgroup limit), else half the physical memory."""
    if os.environ.get(MEMORY_ENV):
        return max(parse_bytes(os.environ[MEMORY_ENV]) - memory_in_use(), 0)
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        avail = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
        except (OSError, ValueError):
            return 1 << 62
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(avail, 0)


def check_fits(stage: str, what: str, estimate: float, param: str, value: object) -> None:
    """Stop with :data:`pipeline.errors.WONT_FIT` when ``estimate`` bytes exceed :func:`available_memory`.

    Called before a build step that holds data proportional to its input (pairs of items,
    training rows), so a build that cannot fit fails at once with the parameter to lower
    instead of being killed by the kernel when memory runs out.
    """
    from .errors import WONT_FIT, ConfigError

    avail = available_memory()
    if estimate > avail:
        limit = os.environ.get(MEMORY_ENV)
        where = f"is left under {MEMORY_ENV}={limit}" if limit else "is available"
        raise ConfigError(WONT_FIT.format(stage=stage, what=what, estimate=format_bytes(estimate),
                                          available=f"{format_bytes(avail)} {where}", param=param, value=value))


def memory_postfix(rows: int) -> dict[str, str]:
    """Progress-bar fields of a long build step: rows written so far and memory in use."""
    return {"rows": f"{rows:,}", "mem": format_bytes(memory_in_use())}


def iter_batches(pipe: Pipeline, queries: pa.Table, *, progress: bool, desc: str,
                 batch_size: int = 256) -> Iterator[pa.Table]:
    """Run ``pipe`` over ``queries`` ``batch_size`` at a time, yielding each batch's output, so a
    build step that only aggregates the candidates holds one batch at a time; the progress bar
    shows the rows produced and the memory in use. An empty ``queries`` yields one empty result."""
    from tqdm.auto import tqdm

    if queries.num_rows == 0:
        yield pipe(queries)
        return
    rows = 0
    with tqdm(total=queries.num_rows, desc=desc, unit="q", disable=not progress) as bar:
        for start in range(0, queries.num_rows, batch_size):
            batch = queries.slice(start, batch_size)
            out = pipe(batch)
            rows += out.num_rows
            bar.update(batch.num_rows)
            bar.set_postfix(memory_postfix(rows), refresh=False)
            yield out


def run_batches(pipe: Pipeline, queries: pa.Table, *, progress: bool, desc: str, batch_size: int = 256) -> pa.Table:
    """:func:`iter_batches` collected into one table (for steps that need every candidate at once)."""
    parts = list(iter_batches(pipe, queries, progress=progress, desc=desc, batch_size=batch_size))
    return pa.concat_tables(parts, promote_options="permissive")
