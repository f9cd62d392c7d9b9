"""``funnel validate``: a data-quality report on a catalog, judgments, interactions or sequences.

Bad data rarely fails loudly: a catalog with repeated ids builds an index whose hits map to the
wrong product, judgments where a fifth of the queries have no relevant item cap recall, titles
mangled by a wrong text decoding (``CafÃ©``) never match a query. :func:`validate_file` reads a
Parquet file (or a folder of shards) with Polars, runs the checks that fit its *kind* and
returns a :class:`ValidationReport`: a list of :class:`Check` results plus detail tables, which
the command line prints as a short summary and can write as JSON and a Markdown page with plots.

**Kinds** and the columns they need (``product_id`` is read as the item id, as everywhere in
Funnel):

==============  ==============================================  ===================================
kind            needs                                           checks specific to it
==============  ==============================================  ===================================
catalog         ``item_id``                                     duplicate ids, near-duplicate titles,
                                                                units in titles and attributes
judgments       ``query_id``, ``item_id``, ``relevance``        duplicate (query, item) pairs, label
                                                                distribution and imbalance, queries
                                                                with no relevant item
interactions    ``user_id``, ``item_id``                        duplicate rows, interactions per user
sequences       ``user_id``, ``items`` (or ``history``, a list)  duplicate users, short sequences
==============  ==============================================  ===================================

``kind="auto"`` picks judgments when there is a ``relevance`` column, sequences when there is a
list column ``items``/``history``, interactions when there are ``user_id`` and ``item_id``, and
catalog when there is an item id and no ``query_id`` (a run output is none of these). Every kind
also gets: the share of null (or blank) values per column, null ids, NaN/inf numbers, numeric
outliers (robust z-score from median and MAD, and Tukey's IQR fences, on numeric columns and on
the lengths of text and list columns), text encoding problems (mojibake such as ``Ã©`` /
``â€™``, control characters, U+FFFD, HTML entities, bytes that are not UTF-8), the spellings of
units after numbers (``12 in.`` / ``12 inch`` / ``12"``) and — given ``items`` (a catalog) — ids
that the catalog does not know.

**Vector columns.** A catalog may carry a vector per item (image embeddings, any list of
floats that ``recall.user_vector`` / ``recall.faiss`` index with ``vector_column``). Every list
(or fixed-size list) of floats in a catalog is checked as one, and ``vector_columns`` (``funnel
validate --vector-column``) declares others or insists that one is there: the share of items
without a vector (null or empty; they are left out of its index), of vectors whose dimension
differs from the most common one, of vectors with NaN, infinite or null values, of vectors of
norm 0 (nothing to normalise) and of odd norms (robust z-score of log norm above 3.5 — a
vector from another model or a unit mix-up). The report's details give each column's dimension
and norm quantiles.

**Thresholds.** Every check measures one number (mostly a share of rows in [0, 1]) and compares
it with two limits from :data:`DEFAULT_THRESHOLDS`: above ``warn`` it warns, above ``fail`` it
fails (strictly above: a limit of 0 means "none allowed"); a limit of ``None`` is off. A TOML
file overrides them, one table per check::

    [null_share]
    warn = 0.3
    fail = 0.9

    [near_duplicate_title_share]
    warn = false          # off

The report's status is the worst status of its checks; :data:`EXIT_CODES` maps it to the exit
code of ``funnel validate`` (pass 0, warn 3, fail 4; 2 stays "could not validate": an unreadable
file, an unknown kind).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import polars as pl

from .errors import ConfigError, DataError

__all__ = ["Check", "Limit", "ValidationReport", "validate_file", "load_thresholds", "detect_kind",
           "DEFAULT_THRESHOLDS", "EXIT_CODES", "KINDS", "normalise_title", "UNIT_FAMILIES"]

KINDS = ("catalog", "judgments", "interactions", "sequences")
EXIT_CODES = {"pass": 0, "warn": 3, "fail": 4}
_ORDER = {"info": 0, "pass": 1, "warn": 2, "fail": 3}

ITEM_ID_NAMES = ("item_id", "product_id")
SEQUENCE_COLUMNS = ("items", "history")
ID_COLUMNS = {"item_id", "product_id", "query_id", "user_id", "session_id"}
#: checks the summary always shows, even when they pass
HEADLINE = ("duplicate_id_share", "duplicate_row_share", "near_duplicate_title_share", "label_imbalance",
            "no_relevant_query_share", "unknown_item_share", "short_sequence_share", "missing_vector_share",
            "vector_dimension_share", "non_finite_vector_share")


@dataclass(frozen=True)
class Limit:
    """Warn when a check's value is above ``warn``, fail when above ``fail`` (``None``: off)."""

    warn: float | None = None
    fail: float | None = None

    def status(self, value: float) -> str:
        if self.fail is not None and value > self.fail:
            return "fail"
        if self.warn is not None and value > self.warn:
            return "warn"
        return "pass"


#: check name -> default limits; what each value measures is in :func:`describe_thresholds`
DEFAULT_THRESHOLDS: dict[str, Limit] = {
    "empty": Limit(None, 0),
    "missing_column": Limit(None, 0),
    "null_share": Limit(0.5, None),
    "null_id_share": Limit(None, 0),
    "non_finite_share": Limit(None, 0),
    "duplicate_id_share": Limit(None, 0),
    "duplicate_row_share": Limit(0, 0.05),
    "near_duplicate_title_share": Limit(0.05, None),
    "outlier_share": Limit(0.05, None),
    "length_outlier_share": Limit(None, None),
    "encoding_share": Limit(0, 0.01),
    "html_entity_share": Limit(0, None),
    "unknown_item_share": Limit(0, 0.05),
    "no_relevant_query_share": Limit(0.3, None),
    "label_imbalance": Limit(10, None),
    "short_sequence_share": Limit(0, None),
    "mixed_unit_families": Limit(None, None),
    "missing_vector_share": Limit(0, None),
    "vector_dimension_share": Limit(None, 0),
    "non_finite_vector_share": Limit(None, 0),
    "zero_norm_vector_share": Limit(0, None),
    "odd_norm_vector_share": Limit(0.01, None),
}

_MEANING = {
    "empty": "1 when the file has no rows",
    "missing_column": "1 when a column the kind needs is missing or of the wrong type",
    "null_share": "share of null (or blank text) values in a column",
    "null_id_share": "share of null ids (or null relevance) in an id column",
    "non_finite_share": "share of NaN or infinite values in a float column",
    "duplicate_id_share": "share of rows whose id repeats an earlier row (catalog items, sequence users)",
    "duplicate_row_share": "share of repeated (query, item) judgments or repeated interaction rows",
    "near_duplicate_title_share": "share of titles equal to an earlier one once normalised",
    "outlier_share": "share of values of a numeric column with robust z-score |0.6745 (x - median) / MAD| > 3.5",
    "length_outlier_share": "the same on log(1 + length) of text and list columns (lengths are long-tailed: off by default)",
    "encoding_share": "share of text values with mojibake, control characters, U+FFFD or non-UTF-8 bytes",
    "html_entity_share": "share of text values with HTML entities (&amp;, &#39;) left from a web export",
    "unknown_item_share": "share of item references not in the --items catalog",
    "no_relevant_query_share": "share of judged queries with no item at or above the relevance threshold",
    "label_imbalance": "majority / minority count of relevant vs not relevant judgments",
    "short_sequence_share": "share of sequences with fewer than 2 items (nothing to predict from)",
    "mixed_unit_families": "number of unit families written more than one way (in. / inch / \")",
    "missing_vector_share": "share of items whose vector (a list of floats) is null or empty",
    "vector_dimension_share": "share of vectors whose dimension differs from the column's most common one",
    "non_finite_vector_share": "share of vectors holding NaN, infinite or null values",
    "zero_norm_vector_share": "share of vectors of norm 0 (they cannot be normalised for cosine)",
    "odd_norm_vector_share": "share of vectors whose log norm has robust z-score > 3.5",
}


def describe_thresholds(limits: dict[str, Limit] | None = None) -> str:
    """One line per check: name, what it measures, warn and fail limits."""
    limits = limits or DEFAULT_THRESHOLDS

    def fmt(v):
        return "off" if v is None else f"{v:g}"

    return "\n".join(f"{name:<28} warn > {fmt(lim.warn):<5} fail > {fmt(lim.fail):<5} {_MEANING[name]}"
                     for name, lim in limits.items())


def load_thresholds(path: str | Path, base: dict[str, Limit] | None = None) -> dict[str, Limit]:
    """Limits from a TOML file (``[check] warn = .. fail = ..``; ``false`` turns one off) over ``base``."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"thresholds file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"thresholds file {path} is not UTF-8 text: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"thresholds file {path} is not valid TOML: {exc}") from exc
    limits = dict(base or DEFAULT_THRESHOLDS)
    for name, table in doc.items():
        if name not in limits:
            raise ConfigError(f"thresholds file {path}: unknown check [{name}]; known: {', '.join(limits)}")
        if not isinstance(table, dict) or set(table) - {"warn", "fail"}:
            raise ConfigError(f"thresholds file {path}: [{name}] takes only 'warn' and 'fail'; got {table!r}")
        values = {}
        for key, v in table.items():
            if v is False:
                values[key] = None
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
                values[key] = float(v)
            else:
                raise ConfigError(f"thresholds file {path}: [{name}] {key} must be a number >= 0 or false; got {v!r}")
        limits[name] = replace(limits[name], **values)
    return limits


def with_fail_limits(limits: dict[str, Limit], **fail: float | None) -> dict[str, Limit]:
    """``limits`` with new fail limits (warn lowered to the fail limit where it was above it)."""
    out = dict(limits)
    for name, value in fail.items():
        if value is None:
            continue
        warn = out[name].warn
        out[name] = Limit(warn if warn is None or warn <= value else value, value)
    return out


# -- checks and report ---------------------------------------------------------------------------


@dataclass
class Check:
    """One measured number compared with its limits."""

    name: str
    value: float
    status: str
    message: str
    column: str | None = None
    count: int | None = None
    total: int | None = None
    limit: Limit | None = None


@dataclass
class ValidationReport:
    """What :func:`validate_file` found: checks plus detail tables (``details``) for the page."""

    path: str
    kind: str
    rows: int
    columns: dict[str, str]
    checks: list[Check] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def status(self) -> str:
        worst = max((c.status for c in self.checks), key=_ORDER.__getitem__, default="pass")
        return "pass" if worst == "info" else worst

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "rows": self.rows, "columns": self.columns,
                "status": self.status, "exit_code": self.exit_code, "seconds": round(self.seconds, 3),
                "checks": [asdict(c) for c in self.checks], "details": self.details}

    def summary(self, *, all_checks: bool = False) -> str:
        """The terminal summary: one line per check that warns or fails (all with ``all_checks``)."""
        lines = [f"{self.path}: {self.kind}, {self.rows:,} rows, {len(self.columns)} columns "
                 f"({', '.join(self.columns)}), checked in {self.seconds:.2f} s"]
        shown = [c for c in self.checks if all_checks or c.status in ("warn", "fail") or c.name in HEADLINE]
        for c in sorted(shown, key=lambda c: -_ORDER[c.status]):
            lines.append(f"  {c.status.upper():<4}  {c.name:<27} {c.message}")
        passed = sum(c.status == "pass" and c not in shown for c in self.checks)
        if not all_checks and passed:
            lines.append(f"  PASS  {passed} other check(s)")
        for family, variants in self.details.get("units", {}).items():
            if len(variants) > 1:
                lines.append(f"  info  units '{family}' written {len(variants)} ways: "
                             + ", ".join(f"{v!r} {n:,}" for v, n in variants.items()))
        if "labels" in self.details:
            lines.append("  info  labels: " + ", ".join(f"{k}: {v:,}" for k, v in self.details["labels"].items()))
        lines.append(f"result: {self.status.upper()} (exit {self.exit_code})")
        return "\n".join(lines)

    # -- files -------------------------------------------------------------------------------

    def write(self, folder: str | Path) -> list[Path]:
        """Write ``report.json``, ``report.md`` and the PNG plots into ``folder``.

        Files are made in a temporary folder first and moved in at the end, so a failure (an
        unwritable folder, a plotting error) leaves no half-written report.
        """
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".validate-", dir=folder))
        except OSError as exc:
            raise DataError(f"cannot write the report to {folder}: {exc.strerror or exc}; choose another --report folder") from exc
        try:
            plots = _plots(self, tmp)
            (tmp / "report.json").write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
            (tmp / "report.md").write_text(_markdown(self, plots))
            names = ["report.json", "report.md", *plots]
            for name in names:
                os.replace(tmp / name, folder / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return [folder / n for n in names]


def _status(limit: Limit, value: float) -> str:
    return "info" if limit.warn is None and limit.fail is None else limit.status(value)


def _share_check(name: str, count: int, total: int, limits: dict[str, Limit], what: str,
                 column: str | None = None) -> Check:
    value = count / total if total else 0.0
    limit = limits[name]
    status = _status(limit, value)
    bound = limit.fail if status == "fail" else limit.warn
    tail = f" > {bound:.2%}" if status in ("warn", "fail") else ""
    where = f"column '{column}': " if column else ""
    return Check(name, value, status, f"{where}{count:,} of {total:,} {what} ({value:.2%}){tail}",
                 column=column, count=count, total=total, limit=limit)


def _value_check(name: str, value: float, limits: dict[str, Limit], message: str, column: str | None = None) -> Check:
    limit = limits[name]
    status = _status(limit, value)
    bound = limit.fail if status == "fail" else limit.warn
    tail = f" (limit {bound:g})" if status in ("warn", "fail") and name not in ("empty", "missing_column") else ""
    return Check(name, float(value), status, message + tail, column=column, limit=limit)


# -- reading -------------------------------------------------------------------------------------


#: rows of a vector column read at a time (512 float32 dimensions: 16 MB)
VECTOR_BATCH_ROWS = 8_192


def _dataset(path: Path, what: str):
    from .data import open_dataset

    if not path.exists():
        raise DataError(f"{what} file {path} does not exist")
    return open_dataset(path)


def _read(path: Path, what: str, columns: list[str] | None = None, dataset=None) -> pl.DataFrame:
    dataset = dataset if dataset is not None else _dataset(path, what)
    try:
        return pl.from_arrow(dataset.to_table(columns=columns))
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataError(f"{what} file {path} is not readable as Parquet: {exc}") from exc


def _item_id_column(columns: Iterable[str]) -> str | None:
    return next((c for c in ITEM_ID_NAMES if c in columns), None)


def _sequence_column(frame: pl.DataFrame) -> str | None:
    return next((c for c in SEQUENCE_COLUMNS if c in frame.columns and isinstance(frame.schema[c], pl.List)), None)


def detect_kind(frame: pl.DataFrame) -> str:
    """The kind a table looks like (see the module docstring); :class:`DataError` if none fits."""
    cols = set(frame.columns)
    if "relevance" in cols:
        return "judgments"
    if _sequence_column(frame) is not None:
        return "sequences"
    if "user_id" in cols and _item_id_column(cols):
        return "interactions"
    if _item_id_column(cols) and "query_id" not in cols:
        return "catalog"
    raise DataError(f"cannot tell what kind of file this is from its columns ({', '.join(frame.columns) or 'none'}); "
                    f"pass --kind {'|'.join(KINDS)}")


def _required(kind: str, frame: pl.DataFrame) -> list[tuple[str, str, Any]]:
    """``(column, expected type description, predicate on the Polars dtype)`` the kind needs."""
    idt = ("an integer or string id", lambda t: t.is_integer() or t == pl.String)
    item = _item_id_column(frame.columns) or "item_id"
    if kind == "catalog":
        return [(item, *idt)]
    if kind == "judgments":
        return [("query_id", *idt), (item, *idt), ("relevance", "a number", lambda t: t.is_numeric())]
    if kind == "interactions":
        return [("user_id", *idt), (item, *idt)]
    seq = _sequence_column(frame) or next((c for c in SEQUENCE_COLUMNS if c in frame.columns), "items")
    return [("user_id", *idt), (seq, "a list of item ids", lambda t: isinstance(t, pl.List))]


#: columns a kind reads as text, when present: a binary or numeric column there is an error
_TEXT_COLUMNS = {"catalog": ("title", "brand", "description"), "judgments": ("query",),
                 "interactions": (), "sequences": ()}


# -- text ----------------------------------------------------------------------------------------

#: problem -> Rust regex (Polars) that finds it in a text value
ENCODING_PATTERNS = {
    "mojibake": r"Ã[\x{80}-\x{BF}]|â€|â[\x{80}-\x{9F}]|Â[\x{A0}-\x{BF}]|ï»¿|\x{89}Û",
    "control characters": r"[\x{00}-\x{08}\x{0B}\x{0C}\x{0E}-\x{1F}\x{7F}-\x{9F}]",
    "replacement character U+FFFD": "\uFFFD",
}
HTML_ENTITY = r"&(?:amp|quot|lt|gt|apos|nbsp|#[0-9]+|#[xX][0-9a-fA-F]+);"

#: unit family -> the spellings looked for right after a number ("12 in.", "3-ft", '8"')
UNIT_FAMILIES = {
    "inch": r'in\.|inches|inch|in\b|"|”',
    "foot": r"ft\.|ft\b|feet|foot|'|’",
    "square foot": r"sq\.\s?ft\.?|sq\s?ft\b|square\s+feet|square\s+foot",
    "pound": r"lbs\.|lbs\b|lb\.|lb\b|pounds|pound",
    "ounce": r"oz\.|oz\b|ounces|ounce",
    "fluid ounce": r"fl\.\s?oz\.?|fl\s?oz\b|fluid\s+ounces?",
    "gallon": r"gal\.|gal\b|gallons|gallon",
    "millimetre": r"mm\b|millimeters?|millimetres?",
    "millilitre": r"ml\b|milliliters?|millilitres?",
    "volt": r"v\b|volts?",
    "watt": r"w\b|watts?",
}

_COLOURS = ("black white red blue green yellow orange purple pink brown gray grey silver gold beige ivory tan navy "
            "teal bronze chrome nickel brass copper satin matte gloss glossy clear natural almond bisque biscuit "
            "charcoal espresso cherry walnut oak maple stainless").split()
_SIZES = r"(?:x{0,3}s|x{0,3}l|m|small|medium|large|x-large|xx-large|petite|king|queen|twin|full)"
_UNIT_TOKEN = (r'\d+(?:[./]\d+)?\s*-?\s*(?:in\.?|inch(?:es)?|ft\.?|feet|foot|lbs?\.?|oz\.?|fl\.?\s*oz\.?|gal\.?|gallons?'
               r'|mm|cm|ml|qt\.?|pk|pack|count|ct|piece|pc|sq\.?\s*ft\.?|cu\.?\s*ft\.?|v|volt|w|watt|amp|"|\')')


def normalise_title(expr: pl.Expr) -> pl.Expr:
    """Lower case, without size/colour tokens ("12 in.", "xl", "white"), punctuation or spaces.

    Two titles with the same normalised form are near-duplicates: usually size or colour
    variants of one product, or the same product listed twice.
    """
    out = expr.str.to_lowercase().str.replace_all(_UNIT_TOKEN, " ")
    out = out.str.replace_all(rf"\b(?:{'|'.join(_COLOURS)}|{_SIZES})\b", " ")
    return out.str.replace_all(r"[^\p{L}\p{N}]+", "")


def _text_series(frame: pl.DataFrame, column: str) -> pl.Series:
    """A string or list-of-strings column as one string Series (lists flattened)."""
    s = frame.get_column(column)
    if isinstance(s.dtype, pl.List):
        s = s.explode()
    return s.drop_nulls()


def _text_columns(frame: pl.DataFrame) -> list[str]:
    return [c for c, t in frame.schema.items()
            if c not in ID_COLUMNS and (t == pl.String or (isinstance(t, pl.List) and t.inner == pl.String))
            and c not in SEQUENCE_COLUMNS]


# -- the checks ----------------------------------------------------------------------------------


def _check_columns(kind: str, frame: pl.DataFrame, limits, checks: list[Check]) -> bool:
    ok = True
    for column, expected, fits in _required(kind, frame):
        if column not in frame.columns:
            alias = " (or product_id)" if column == "item_id" else ""
            checks.append(_value_check("missing_column", 1, limits,
                                       f"a {kind} file needs column '{column}'{alias} ({expected}); it has: "
                                       f"{', '.join(frame.columns)}", column))
            ok = False
        elif not fits(frame.schema[column]):
            checks.append(_value_check("missing_column", 1, limits,
                                       f"column '{column}' must be {expected}; found {frame.schema[column]}", column))
            ok = False
    for column in _TEXT_COLUMNS[kind]:
        if column in frame.columns and frame.schema[column] not in (pl.String, pl.Null):
            found = frame.schema[column]
            hint = " (bytes: store it as UTF-8 text)" if found == pl.Binary else ""
            checks.append(_value_check("missing_column", 1, limits,
                                       f"column '{column}' must be text (string); found {found}{hint}", column))
    return ok


def _check_nulls(frame: pl.DataFrame, limits, checks: list[Check], details: dict) -> None:
    n = frame.height
    counts = frame.null_count().row(0, named=True)
    shares = {}
    for column, dtype in frame.schema.items():
        missing = counts[column]
        if dtype == pl.String:
            missing += int(frame.select(pl.col(column).str.strip_chars().eq("").sum()).item() or 0)
        shares[column] = missing / n
        if column in ID_COLUMNS or column == "relevance":
            checks.append(_share_check("null_id_share", missing, n, limits, "null", column))
        else:
            what = "null or blank" if dtype == pl.String else "null"
            checks.append(_share_check("null_share", missing, n, limits, what, column))
        if dtype.is_float():
            bad = int(frame.select((~pl.col(column).is_finite()).sum()).item() or 0)
            checks.append(_share_check("non_finite_share", bad, n, limits, "NaN or infinite", column))
    details["null_share"] = shares


def _check_encoding(frame: pl.DataFrame, limits, checks: list[Check], details: dict) -> None:
    found: dict[str, dict[str, Any]] = {}
    for column in _text_columns(frame):
        s = _text_series(frame, column)
        if not len(s):
            continue
        hits = {problem: s.str.contains(pattern) for problem, pattern in ENCODING_PATTERNS.items()}
        per = {problem: {"count": int(hit.sum()), "example": _clip(s.filter(hit).head(1).item())}
               for problem, hit in hits.items() if hit.any()}
        bad = int(pl.DataFrame(hits).select(pl.any_horizontal(pl.all()).sum()).item())
        checks.append(_share_check("encoding_share", bad, len(s), limits, "text values with encoding problems", column))
        if per:
            checks[-1].message += " — " + ", ".join(f"{p} {v['count']:,}" for p, v in per.items())
        entity = s.str.contains(HTML_ENTITY)
        checks.append(_share_check("html_entity_share", int(entity.sum()), len(s), limits,
                                   "text values with HTML entities", column))
        if entity.any():
            per["HTML entities"] = {"count": int(entity.sum()), "example": _clip(s.filter(entity).head(1).item())}
        if per:
            found[column] = per
    for column, dtype in frame.schema.items():
        if dtype == pl.Binary:
            values = frame.get_column(column).drop_nulls()
            bad, example = 0, None
            for v in values:
                try:
                    v.decode("utf-8")
                except UnicodeDecodeError:
                    bad += 1
                    example = example or _clip(repr(v))
            checks.append(_share_check("encoding_share", bad, len(values), limits, "values that are not UTF-8", column))
            if bad:
                found[column] = {"invalid UTF-8": {"count": bad, "example": example}}
    details["encoding"] = found


def _clip(text: str, n: int = 120) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _numeric_series(frame: pl.DataFrame, kind: str) -> dict[str, tuple[pl.Series, bool]]:
    """``name -> (values, is_length)``: numeric columns (not ids or labels), lengths of text and lists."""
    out = {}
    for column, dtype in frame.schema.items():
        if column in ID_COLUMNS or column == "relevance":
            continue
        if dtype.is_numeric():
            out[column] = (frame.get_column(column).cast(pl.Float64), False)
        elif dtype == pl.String:
            out[f"len({column})"] = (frame.get_column(column).str.len_chars().cast(pl.Float64), True)
        elif isinstance(dtype, pl.List):
            out[f"len({column})"] = (frame.get_column(column).list.len().cast(pl.Float64), True)
    if kind == "interactions" and "user_id" in frame.columns:
        out["interactions per user"] = (frame.group_by("user_id").len().get_column("len").cast(pl.Float64), True)
    return out


def _robust_outliers(s: pl.Series) -> tuple[int, int, float]:
    """``(MAD outliers, IQR outliers, MAD)``: |0.6745 (x - median) / MAD| > 3.5, and outside Tukey's fences.

    When more than half the values are equal (MAD 0) the mean absolute deviation stands in
    for it (scaled by 1.2533, as for a normal distribution).
    """
    med = s.median()
    dev = (s - med).abs()
    mad = dev.median()
    scale = mad / 0.6745 if mad else 1.253314 * dev.mean()
    n_mad = int((dev / scale > 3.5).sum()) if scale else 0
    q1, q3 = s.quantile(0.25), s.quantile(0.75)
    n_iqr = int(((s < q1 - 1.5 * (q3 - q1)) | (s > q3 + 1.5 * (q3 - q1))).sum())
    return n_mad, n_iqr, mad


def _histogram(s: pl.Series, *, log: bool, bins: int = 30) -> dict[str, list[float]]:
    import numpy as np

    x = s.to_numpy()
    edges = np.unique(np.geomspace(max(x.min(), 0) + 1, x.max() + 1, bins + 1) - 1) if log else bins
    counts, edges = np.histogram(x, bins=edges)
    return {"counts": counts.tolist(), "edges": [float(e) for e in edges]}


def _check_outliers(frame: pl.DataFrame, kind: str, limits, checks: list[Check], details: dict) -> None:
    stats = {}
    for name, (s, is_length) in _numeric_series(frame, kind).items():
        s = s.filter(s.is_finite())
        if s.n_unique() < 5:
            continue  # a flag, a rating or a short attribute list: too few values for outliers to mean anything
        n_mad, n_iqr, mad = _robust_outliers((s + 1).log() if is_length else s)
        stats[name] = {"count": len(s), "min": s.min(), "q1": s.quantile(0.25), "median": s.median(),
                       "q3": s.quantile(0.75), "max": s.max(), "mad_outliers": n_mad, "iqr_outliers": n_iqr,
                       "scale": "log(1 + x)" if is_length else "x", "largest": s.top_k(3).to_list(),
                       "histogram": _histogram(s, log=is_length)}
        check = _share_check("length_outlier_share" if is_length else "outlier_share", n_mad, len(s), limits,
                             "values with |robust z| > 3.5" + (" on a log scale" if is_length else ""), name)
        check.message += f" (IQR fences: {n_iqr:,}; median {s.median():g}, max {s.max():g})"
        checks.append(check)
    details["numeric"] = stats


def _check_duplicates(kind: str, frame: pl.DataFrame, limits, checks: list[Check], details: dict) -> None:
    n = frame.height
    item = _item_id_column(frame.columns)
    if kind in ("catalog", "sequences"):
        column = item if kind == "catalog" else "user_id"
        ids = frame.get_column(column)
        repeats = n - ids.n_unique()
        checks.append(_share_check("duplicate_id_share", repeats, n, limits, "rows repeat an earlier id", column))
        if repeats:
            dup = frame.group_by(column).len().filter(pl.col("len") > 1).sort("len", descending=True).head(5)
            details["duplicate_ids"] = dup.rows()
    elif kind == "judgments":
        repeats = n - frame.select(pl.struct("query_id", item).n_unique()).item()
        checks.append(_share_check("duplicate_row_share", repeats, n, limits, "judgments repeat a (query_id, item) pair"))
    else:
        repeats = n - frame.n_unique() if not any(isinstance(t, pl.List) for t in frame.schema.values()) else 0
        checks.append(_share_check("duplicate_row_share", repeats, n, limits, "rows repeat an earlier row"))


def _check_titles(frame: pl.DataFrame, limits, checks: list[Check], details: dict) -> None:
    if "title" not in frame.columns or frame.schema["title"] != pl.String:
        return
    item = _item_id_column(frame.columns)
    keyed = frame.select(pl.col(item).alias("id"), pl.col("title"),
                         normalise_title(pl.col("title")).alias("key")).filter(pl.col("key").str.len_chars() > 0)
    groups = keyed.group_by("key").agg(pl.len().alias("n"), pl.col("id").head(3), pl.col("title").head(3))
    groups = groups.filter(pl.col("n") > 1).sort(["n", "key"], descending=[True, False])
    repeats = int(groups.get_column("n").sum() - groups.height) if groups.height else 0
    checks.append(_share_check("near_duplicate_title_share", repeats, keyed.height, limits,
                               "titles repeat an earlier one once normalised", "title"))
    details["near_duplicates"] = [{"key": r["key"], "count": r["n"], "ids": r["id"], "titles": r["title"]}
                                  for r in groups.head(10).iter_rows(named=True)]


def _check_units(frame: pl.DataFrame, limits, checks: list[Check], details: dict) -> None:
    columns = _text_columns(frame)
    if not columns:
        return
    text = pl.concat([_text_series(frame, c) for c in columns]).alias("t").to_frame()
    families = sorted(UNIT_FAMILIES, key=lambda f: " " not in f)  # "square foot" before "foot"
    anywhere = "|".join(UNIT_FAMILIES[f] for f in families)
    words = pl.col("t").str.replace_all(r"(?i)\d+\s*-\s*in\s*-\s*\d+", " ")  # "2-in-1" is no inch
    tokens = (text.select(words.str.extract_all(rf"(?i)\d[\s-]?(?:{anywhere})").alias("u"))
              .explode("u").drop_nulls()
              .select(pl.col("u").str.replace(r"^\d[\s-]?", "").str.to_lowercase().str.replace_all(r"\s+", " ")))
    units: dict[str, dict[str, int]] = {}
    for token, count in tokens.group_by("u").len().sort(["len", "u"], descending=[True, False]).rows():
        family = next(f for f in families if re.fullmatch(rf"(?i)(?:{UNIT_FAMILIES[f]})", token))
        units.setdefault(family, {})[token] = count
    units = {f: units[f] for f in UNIT_FAMILIES if f in units}
    mixed = [f for f, v in units.items() if len(v) > 1]
    checks.append(_value_check("mixed_unit_families", len(mixed), limits,
                               f"{len(mixed)} of {len(units)} unit families found are written more than one way"
                               + (f" ({', '.join(mixed)})" if mixed else "")))
    details["units"] = units


def _check_judgments(frame: pl.DataFrame, limits, checks: list[Check], details: dict, relevant: float) -> None:
    rel = frame.filter(pl.col("relevance").is_not_null() & pl.col("relevance").cast(pl.Float64).is_finite())
    labels = rel.group_by(pl.col("relevance").round(2)).len().sort("relevance")
    details["labels"] = {f"{k:g}": v for k, v in labels.rows()}
    n_rel = int((rel.get_column("relevance") >= relevant).sum())
    n_not = rel.height - n_rel
    ratio = max(n_rel, n_not) / min(n_rel, n_not) if min(n_rel, n_not) else math.inf
    details["relevant_threshold"] = relevant
    checks.append(_value_check("label_imbalance", ratio, limits,
                               f"{n_rel:,} relevant (>= {relevant:g}) vs {n_not:,} not: ratio {ratio:.2f}"))
    per_query = frame.group_by("query_id").agg((pl.col("relevance") >= relevant).any().alias("has"),
                                               pl.len().alias("n"))
    none = int((~per_query.get_column("has").fill_null(False)).sum())
    checks.append(_share_check("no_relevant_query_share", none, per_query.height, limits,
                               f"queries have no item with relevance >= {relevant:g}"))
    details["judged_per_query"] = per_query.get_column("n").describe().rows()


def _check_sequences(frame: pl.DataFrame, limits, checks: list[Check], details: dict) -> None:
    seq = _sequence_column(frame)
    lengths = frame.get_column(seq).list.len().fill_null(0)
    short = int((lengths < 2).sum())
    checks.append(_share_check("short_sequence_share", short, frame.height, limits, "sequences have fewer than 2 items", seq))
    inner_nulls = frame.get_column(seq).explode(empty_as_null=False, keep_nulls=False).null_count()
    total = int(lengths.sum())
    checks.append(_share_check("null_id_share", inner_nulls, total, limits, "item ids inside sequences are null", f"{seq}[]"))
    details["sequence_length"] = {"min": int(lengths.min()), "median": float(lengths.median()), "max": int(lengths.max()),
                                  "interactions": total}


def _is_vector_type(dtype: pl.DataType, *, declared: bool = False) -> bool:
    """A list or fixed-size list of floats (of numbers when the column is declared a vector)."""
    if not isinstance(dtype, (pl.List, pl.Array)):
        return False
    inner = dtype.inner
    return inner.is_float() or (declared and inner.is_numeric())


def vector_columns_of(frame: pl.DataFrame, declared: Iterable[str] = ()) -> list[str]:
    """The columns checked as vectors: the declared ones, then every list of floats."""
    found = list(dict.fromkeys(declared))
    return found + [c for c, t in frame.schema.items() if c not in found and _is_vector_type(t)]


def _column_batches(dataset, column: str):
    """``column`` of every file of ``dataset``, one row group at a time in batches of
    :data:`VECTOR_BATCH_ROWS` (a scan across row groups buffers far more: 2.3 GB of a 2 GB file of
    512-d vectors, against 150 MB this way)."""
    import pyarrow.parquet as pq

    for file in dataset.files:
        parquet = pq.ParquetFile(file)
        for group in range(parquet.num_row_groups):
            yield from parquet.iter_batches(batch_size=VECTOR_BATCH_ROWS, row_groups=[group], columns=[column])


def _vector_rows(dataset, column: str, dtype: pl.DataType) -> pl.DataFrame:
    """Per row of ``column``: its dimension, whether it holds a non-finite or null value, its L2
    norm and whether it is null, read :data:`VECTOR_BATCH_ROWS` rows at a time (a few numbers
    per item are kept, never the vectors)."""
    col = pl.col(column).cast(pl.List(dtype.inner)) if isinstance(dtype, pl.Array) else pl.col(column)
    parts = [pl.from_arrow(batch).select(
        col.list.len().alias("dim"),
        col.list.eval(pl.element().is_finite().not_().fill_null(True)).list.any().alias("bad"),
        col.list.eval(pl.element().cast(pl.Float64).pow(2)).list.sum().sqrt().alias("norm"),
        col.is_null().alias("null"))
        for batch in _column_batches(dataset, column) if batch.num_rows]
    return pl.concat(parts) if parts else pl.DataFrame(schema={"dim": pl.UInt32, "bad": pl.Boolean,
                                                               "norm": pl.Float64, "null": pl.Boolean})


def _check_vectors(frame: pl.DataFrame, empty: pl.DataFrame, dataset, declared: tuple[str, ...], limits,
                   checks: list[Check], details: dict) -> None:
    """Vector columns of ``dataset`` (``empty``: no rows, every column; ``frame`` holds the others),
    read a batch at a time: nulls, dimension, NaN/inf, zero and odd norms."""
    schema = empty.schema
    stats = {}
    for column in vector_columns_of(empty, declared):
        if column not in schema:
            checks.append(_value_check("missing_column", 1, limits, f"vector column '{column}' is declared but the "
                                       f"file has only: {', '.join(schema.names())}", column))
            continue
        dtype = schema[column]
        if not _is_vector_type(dtype, declared=True):
            checks.append(_value_check("missing_column", 1, limits, f"vector column '{column}' must be a list of "
                                       f"floats (list<float32> or fixed_size_list<float32>[d]); found {dtype}", column))
            continue
        v = _vector_rows(dataset, column, dtype)
        nulls = int(v.get_column("null").sum())  # _check_nulls saw only the columns in frame
        checks.append(_share_check("null_share", nulls, frame.height, limits, "null", column))
        details.setdefault("null_share", {})[column] = nulls / max(frame.height, 1)
        present = v.filter(pl.col("dim").fill_null(0) > 0)
        n, m = frame.height, present.height
        checks.append(_share_check("missing_vector_share", n - m, n, limits, "items without a vector (null or empty)",
                                   column))
        if not m:
            continue
        dims = present.group_by("dim").len().sort(["len", "dim"], descending=[True, False])
        dim = int(dims.item(0, "dim"))
        off = present.filter(pl.col("dim") != dim)
        check = _share_check("vector_dimension_share", off.height, m, limits,
                             f"vectors whose dimension is not {dim} (the most common)", column)
        if off.height:
            check.message += " — found " + ", ".join(f"{int(d)}: {c:,}" for d, c in dims.rows()[1:4])
        checks.append(check)
        bad = int(present.get_column("bad").sum())
        checks.append(_share_check("non_finite_vector_share", bad, m, limits, "vectors with NaN, infinite or null "
                                   "values", column))
        norms = present.filter(~pl.col("bad") & (pl.col("dim") == dim)).get_column("norm")  # one dimension
        zero = int((norms == 0).sum())
        checks.append(_share_check("zero_norm_vector_share", zero, m, limits, "vectors of norm 0", column))
        positive = norms.filter(norms > 0)
        n_odd = _robust_outliers(positive.log())[0] if len(positive) > 1 else 0
        check = _share_check("odd_norm_vector_share", n_odd, len(positive), limits,
                             "vectors with |robust z| > 3.5 on log norm", column)
        if len(positive):
            check.message += f" (norms: min {positive.min():.3g}, median {positive.median():.3g}, max {positive.max():.3g})"
        checks.append(check)
        stats[column] = {"dimension": dim, "dimensions": {str(int(d)): c for d, c in dims.rows()},
                         "with_vector": m, "without_vector": n - m, "non_finite": bad, "zero_norm": zero,
                         "odd_norm": n_odd,
                         "norm": ({q: float(positive.quantile(x)) for q, x in
                                   (("min", 0.0), ("q1", 0.25), ("median", 0.5), ("q3", 0.75), ("max", 1.0))}
                                  if len(positive) else {})}
    if stats:
        details["vectors"] = stats


def _known_items(path: Path) -> pl.Series:
    frame = _read(path, "items")
    column = _item_id_column(frame.columns)
    if column is None:
        raise DataError(f"items file {path} needs column item_id (or product_id); it has: {', '.join(frame.columns)}")
    return frame.get_column(column).drop_nulls().cast(pl.String).unique()


def _check_unknown(kind: str, frame: pl.DataFrame, items: Path, limits, checks: list[Check], details: dict) -> None:
    known = _known_items(items)
    if kind == "sequences":
        column = _sequence_column(frame)
        refs = frame.get_column(column).explode().drop_nulls()
    else:
        column = _item_id_column(frame.columns)
        refs = frame.get_column(column).drop_nulls()
    refs = refs.cast(pl.String)
    unknown = refs.filter(~refs.is_in(known.implode()))
    checks.append(_share_check("unknown_item_share", len(unknown), len(refs), limits,
                               f"item references are not in {items.name}", column))
    details["unknown_items"] = {"count": len(unknown), "distinct": unknown.n_unique(),
                                "examples": unknown.unique(maintain_order=True).head(5).to_list(),
                                "catalog": str(items), "catalog_items": len(known)}


def validate_file(path: str | Path, kind: str = "auto", *, items: str | Path | None = None,
                  thresholds: dict[str, Limit] | None = None, relevant_threshold: float = 2.67,
                  vector_columns: Iterable[str] = ()) -> ValidationReport:
    """Check one Parquet file (or folder of shards) and return the report; see the module docstring.

    ``vector_columns`` names catalog columns that must hold a vector per item (lists of floats
    are checked as vectors anyway; a declared column that is missing fails).

    Raises :class:`DataError` only when the file cannot be checked at all (missing, not Parquet,
    a kind that cannot be told); everything else, an empty file or a missing column included,
    is a failed :class:`Check` in the report.
    """
    t0 = time.perf_counter()
    if kind not in ("auto", *KINDS):
        raise ConfigError(f"--kind must be one of auto, {', '.join(KINDS)}; got {kind!r}")
    limits = dict(DEFAULT_THRESHOLDS)
    limits.update(thresholds or {})
    path = Path(path)
    what = kind if kind != "auto" else "input"
    dataset = _dataset(path, what)
    try:
        empty = pl.from_arrow(dataset.schema.empty_table())
    except Exception as exc:
        raise DataError(f"{what} file {path} is not readable as Parquet: {exc}") from exc
    if kind == "auto":
        kind = detect_kind(empty)
    # a catalog's vector columns (image embeddings: often most of the file) are checked a batch at
    # a time (_check_vectors), never loaded whole; every other column is read into one frame
    streamed = ([c for c in vector_columns_of(empty, vector_columns)
                 if c in empty.columns and _is_vector_type(empty.schema[c], declared=True)] if kind == "catalog" else [])
    frame = _read(path, what, [c for c in empty.columns if c not in streamed] if streamed else None, dataset)
    report = ValidationReport(str(path), kind, frame.height, {c: str(t) for c, t in empty.schema.items()})
    checks, details = report.checks, report.details
    if frame.height == 0:
        checks.append(_value_check("empty", 1, limits, "the file has no rows"))
    elif _check_columns(kind, frame, limits, checks):
        _check_nulls(frame, limits, checks, details)
        _check_duplicates(kind, frame, limits, checks, details)
        _check_encoding(frame, limits, checks, details)
        _check_outliers(frame, kind, limits, checks, details)
        _check_units(frame, limits, checks, details)
        if kind == "catalog":
            _check_titles(frame, limits, checks, details)
            _check_vectors(frame, empty, dataset, tuple(vector_columns), limits, checks, details)
        elif kind == "judgments":
            _check_judgments(frame, limits, checks, details, relevant_threshold)
        elif kind == "sequences":
            _check_sequences(frame, limits, checks, details)
        if items is not None and kind != "catalog":
            _check_unknown(kind, frame, Path(items), limits, checks, details)
    report.seconds = time.perf_counter() - t0
    return report


# -- the page ------------------------------------------------------------------------------------


def _plots(report: ValidationReport, folder: Path) -> list[str]:
    """PNG plots for the page; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(folder / name, dpi=90)
        plt.close(fig)
        made.append(name)

    shares = report.details.get("null_share")
    if shares:
        fig, ax = plt.subplots(figsize=(6, 0.35 * len(shares) + 1.2))
        names = list(shares)
        ax.barh(names, [shares[n] for n in names], color="#4c72b0")
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of null or blank values")
        ax.invert_yaxis()
        save(fig, "null_share.png")
    labels = report.details.get("labels")
    if labels:
        fig, ax = plt.subplots(figsize=(6, 3))
        threshold = report.details.get("relevant_threshold", math.inf)
        ax.bar(list(labels), list(labels.values()),
               color=["#55a868" if float(k) >= threshold else "#c44e52" for k in labels])
        ax.set_xlabel(f"relevance (green: >= {threshold:g})")
        ax.set_ylabel("judgments")
        save(fig, "labels.png")
    numeric = report.details.get("numeric")
    if numeric:
        names = list(numeric)[:6]
        fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 2.8), squeeze=False)
        for ax, name in zip(axes[0], names):
            st, hist = numeric[name], numeric[name]["histogram"]
            ax.stairs(hist["counts"], hist["edges"], fill=True, color="#4c72b0")
            if st["scale"] != "x":
                ax.set_xscale("symlog")
            ax.set_yscale("log")
            ax.set_title(f"{name}: median {st['median']:g}, max {st['max']:g}\n"
                         f"{st['mad_outliers']:,} MAD / {st['iqr_outliers']:,} IQR outliers", fontsize=8)
        save(fig, "numeric.png")
    units = report.details.get("units")
    if units:
        fams = list(units)
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(fams) + 1.2))
        for i, fam in enumerate(fams):
            total, left = sum(units[fam].values()), 0.0
            for variant, count in units[fam].items():
                ax.barh(i, count / total, left=left, edgecolor="white")
                if count / total > 0.07:
                    ax.text(left + count / total / 2, i, variant, ha="center", va="center", fontsize=7)
                left += count / total
        ax.set_yticks(range(len(fams)), [f"{f} ({sum(units[f].values()):,})" for f in fams])
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of each spelling among a unit's occurrences after a number")
        save(fig, "units.png")
    return made


def _cell(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _markdown(report: ValidationReport, plots: list[str]) -> str:
    out = [f"# Data quality: `{Path(report.path).name}`", "",
           f"Kind **{report.kind}**, {report.rows:,} rows, {len(report.columns)} columns, "
           f"checked in {report.seconds:.2f} s. Result: **{report.status.upper()}** (exit code {report.exit_code}).", "",
           "| status | check | column | value | message |", "|---|---|---|---|---|"]
    for c in sorted(report.checks, key=lambda c: -_ORDER[c.status]):
        out.append(f"| {c.status} | {c.name} | {c.column or ''} | {c.value:.4g} | {_cell(c.message)} |")
    out.append("")
    titles = {"null_share.png": "Null or blank values per column", "labels.png": "Label distribution",
              "numeric.png": "Numeric columns and lengths (min, quartiles, max)", "units.png": "Unit spellings"}
    for name in plots:
        out += [f"## {titles.get(name, name)}", "", f"![{name}]({name})", ""]
    d = report.details
    if d.get("encoding"):
        out += ["## Encoding problems", "", "| column | problem | count | example |", "|---|---|---|---|"]
        for column, per in d["encoding"].items():
            for problem, v in per.items():
                out.append(f"| {column} | {problem} | {v['count']:,} | {_cell(ascii(v['example'])[1:-1])} |")
        out.append("")
    if d.get("near_duplicates"):
        out += ["## Largest near-duplicate title groups", "", "| count | ids | titles |", "|---|---|---|"]
        for g in d["near_duplicates"]:
            titles_ = _cell(" / ".join(_clip(t, 60) for t in g["titles"]))
            out.append(f"| {g['count']} | {', '.join(map(str, g['ids']))} | {titles_} |")
        out.append("")
    if d.get("units"):
        out += ["## Units", "", "| family | spellings (count) |", "|---|---|"]
        for fam, variants in d["units"].items():
            out.append(f"| {fam} | {_cell(', '.join(f'{v} ({n:,})' for v, n in variants.items()))} |")
        out.append("")
    if d.get("labels"):
        out += ["## Labels", "", "| relevance | judgments |", "|---|---|"]
        out += [f"| {k} | {v:,} |" for k, v in d["labels"].items()]
        out.append("")
    if d.get("unknown_items"):
        u = d["unknown_items"]
        out += ["## Unknown items", "", f"{u['count']:,} references ({u['distinct']:,} distinct ids) are not among the "
                f"{u['catalog_items']:,} items of `{u['catalog']}`; e.g. {', '.join(map(str, u['examples']))}.", ""]
    return "\n".join(out)
