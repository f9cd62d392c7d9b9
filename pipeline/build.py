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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa

from .config import PipelineConfig, stage_to_spec
from .stage import Pipeline, Stage

__all__ = ["BuildContext", "artifact_keys", "build_artifacts", "find_upstream", "run_batches", "upstream_key",
           "walk_stages"]


@dataclass
class BuildContext:
    config: PipelineConfig
    force: bool = False
    progress: bool = True
    log: Callable[[str], None] = field(default=print)
    #: the pipeline being built (every stage, so a stage can find the ones after it)
    pipeline: Pipeline | None = None

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
                    log: Callable[[str], None] = print, only: Callable[[Stage], bool] | None = None) -> Pipeline:
    """Build the artifacts of every stage of ``cfg`` that has a ``build`` method; return the pipeline."""
    pipe = cfg.build()
    ctx = BuildContext(cfg, force=force, progress=progress, log=log, pipeline=pipe)
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


def run_batches(pipe: Pipeline, queries: pa.Table, *, progress: bool, desc: str, batch_size: int = 256) -> pa.Table:
    """Run ``pipe`` over ``queries`` ``batch_size`` at a time with a progress bar (builds that need
    upstream candidates: rankers, item statistics); one table out."""
    from tqdm.auto import tqdm

    parts = []
    with tqdm(total=queries.num_rows, desc=desc, unit="q", disable=not progress) as bar:
        for start in range(0, queries.num_rows, batch_size):
            batch = queries.slice(start, batch_size)
            parts.append(pipe(batch))
            bar.update(batch.num_rows)
    if not parts:
        return pipe(queries)
    return pa.concat_tables(parts, promote_options="permissive")
