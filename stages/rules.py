"""Business rules as a filter stage: declarative rules from the config, one Polars expression.

See :class:`RuleFilter` for the rule grammar.
"""

from __future__ import annotations

import datetime
import operator
from functools import reduce
from typing import Any

import polars as pl
import pyarrow as pa

from pipeline.columns import QUERY_ID, RANK
from pipeline.errors import ConfigError, DataError
from pipeline.schema import ANY, take_rows
from pipeline.stage import Stage, StageTags

from .gpu_util import FILTER_GPU_MIN_ROWS, collect, gpu_pays_off

__all__ = ["RuleFilter", "OPS"]


def _kind(value: Any) -> str | None:
    """The kind of a rule literal: ``bool``, ``number``, ``string``, ``temporal``, or None."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (datetime.date, datetime.time)):
        return "temporal"
    return None


#: which Polars column types each kind of literal may be compared with
_FITS = {
    "bool": lambda t: t == pl.Boolean,
    "number": lambda t: t.is_numeric(),
    "string": lambda t: t in (pl.String, pl.Categorical, pl.Enum),
    "temporal": lambda t: t.is_temporal(),
}


def _in(column: str, values: list, strict: bool = False) -> pl.Expr:
    series = pl.Series(values, strict=False)
    if series.dtype.is_float():
        return pl.col(column).cast(pl.Float64).is_in(pl.lit(series).implode())
    return pl.col(column).is_in(pl.lit(series).cast(pl.dtype_of(column), strict=strict).implode())


def _between(column: str, rule: dict) -> pl.Expr:
    bounds = []
    if "min" in rule:
        bounds.append(pl.col(column) >= rule["min"])
    if "max" in rule:
        bounds.append(pl.col(column) <= rule["max"])
    return reduce(operator.and_, bounds)


def _contains(column: str, rule: dict) -> pl.Expr:
    text = pl.col(column).cast(pl.String)
    if rule.get("ignore_case", False):
        return text.str.to_lowercase().str.contains(rule["value"].lower(), literal=True)
    return text.str.contains(rule["value"], literal=True)


#: op -> (builder(column, rule) -> expression, required keys, optional keys); the only ops there are
OPS: dict[str, tuple[Any, tuple[str, ...], tuple[str, ...]]] = {
    "eq": (lambda c, r: pl.col(c) == r["value"], ("value",), ()),
    "ne": (lambda c, r: pl.col(c) != r["value"], ("value",), ()),
    "lt": (lambda c, r: pl.col(c) < r["value"], ("value",), ()),
    "le": (lambda c, r: pl.col(c) <= r["value"], ("value",), ()),
    "gt": (lambda c, r: pl.col(c) > r["value"], ("value",), ()),
    "ge": (lambda c, r: pl.col(c) >= r["value"], ("value",), ()),
    "between": (_between, (), ("min", "max")),
    "in": (lambda c, r: _in(c, r["values"], r["strict"]), (), ("values", "values_file")),
    "not_in": (lambda c, r: ~_in(c, r["values"], r["strict"]), (), ("values", "values_file")),
    "contains": (_contains, ("value",), ("ignore_case",)),
    "is_null": (lambda c, r: pl.col(c).is_null(), (), ()),
    "not_null": (lambda c, r: pl.col(c).is_not_null(), (), ()),
}
_COMMON = ("column", "op", "negate")


def _show(rule: Any, limit: int = 160) -> str:
    text = repr(rule)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RuleFilter(Stage):
    """Keep the candidates that satisfy declarative business rules; optionally dedupe them.

    Rules are data, never code: each is a small table that is checked when the pipeline is
    built and compiled into a single Polars expression. Nothing in a rule is evaluated as Python
    or as a Polars/SQL expression; ``op`` is looked up in the fixed table :data:`OPS`, ``column``
    is only ever a column name and values are only ever literals.

    Config example::

        [[stages]]
        type = "filter.rules"
        params.dedupe_by = "product_group"
        params.rules = [
            {column = "in_stock", op = "eq", value = true},
            {column = "brand", op = "not_in", values = ["banned-brand"]},
            {column = "price", op = "between", min = 5.0, max = 100.0},
            {column = "title", op = "contains", value = "refurbished", ignore_case = true, negate = true},
            {any = [{column = "rating", op = "ge", value = 4}, {column = "is_new", op = "eq", value = true}]},
        ]

    **Combining.** ``rules`` is a list; a row is kept when *every* rule holds (AND). An
    ``{any = [rule, ...]}`` rule holds when at least one of its sub-rules holds (OR); sub-rules
    may themselves be ``any`` rules. Any rule may carry ``negate = true`` (NOT). With no rules,
    every row is kept.

    **Ops.** Every rule except ``any`` has ``column`` (a column name) and ``op``:

    ====================  ==========================================  ===========================
    op                    keys                                        holds when the value ...
    ====================  ==========================================  ===========================
    ``eq`` ``ne``         ``value``                                   equals / differs from it
    ``lt`` ``le``         ``value``                                   is <, <= it
    ``gt`` ``ge``         ``value``                                   is >, >= it
    ``between``           ``min`` and/or ``max`` (at least one)       min <= value <= max
    ``in``                ``values`` (a list) or ``values_file``      is one of them
    ``not_in``            ``values`` (a list) or ``values_file``      is none of them
    ``contains``          ``value`` (text), ``ignore_case`` (bool)    contains it as a substring
    ``is_null``                                                       is null
    ``not_null``                                                      is not null
    ====================  ==========================================  ===========================

    * Literals are booleans, numbers, text, or TOML dates/times. Numbers compare with any
      numeric column (integers and floats mix freely), text with string and dictionary
      (categorical) columns, booleans with boolean columns, dates and times with temporal
      columns. Another combination — ``value = "abc"`` on a float column — raises
      :class:`DataError` on the first batch, naming the rule, the column and its type.
    * ``values`` is a list whose items are all of one of those kinds (may be empty).
    * ``values_file`` names a text file with one value per line (surrounding blanks stripped;
      empty lines and lines starting with ``#`` skipped). A relative path is resolved against
      the config file's folder. The file must exist when the pipeline is built and is read in
      ``warm_up()``; its lines are converted to the column's type, and a line that does not
      convert raises :class:`DataError`.
    * ``contains`` matches the literal text, never a pattern; ``ignore_case = true`` lower-cases
      both sides first. It needs a string or categorical column.
    * ``between`` is inclusive on both ends; ``min`` must not be greater than ``max``.

    **Nulls.** A null in a rule's column makes every comparison (``eq`` ... ``between``,
    ``in``, ``not_in``, ``contains``) unknown, and an unknown rule drops the row — also under
    ``negate``, and also for ``ne`` and ``not_in``. Only ``is_null`` and ``not_null`` look at
    nulls. ``any`` follows SQL logic: one sub-rule that holds is enough even if others are
    unknown. To keep rows with a missing value, say so:
    ``{any = [{column = "brand", op = "is_null"}, {column = "brand", op = "not_in", values = ["x"]}]}``.

    **Errors at build time** (:class:`ConfigError`, naming the stage and the rule by its
    1-based position, ``rule 2``, or ``rule 2.1`` for the first sub-rule of rule 2): an unknown
    ``op``, a missing or unknown key, a literal of the wrong type, ``min > max``, a missing
    ``values_file``. A rule naming a column that the upstream stages do not provide fails
    the pipeline's column check with :class:`SchemaError`.

    **Dedupe.** With ``dedupe_by`` set, after filtering only the first row of each
    (``group_by``, ``dedupe_by``) pair is kept, first meaning lowest ``order_by`` (the best
    rank; rows with a null ``order_by`` come last, ties keep their input order). A null
    ``dedupe_by`` value counts as one key. Kept rows stay in their input order.

    Args:
        rules: the rules, as above (``None``: no rules).
        dedupe_by: column to dedupe on within a group, e.g. a product-group id; ``None``: off.
        group_by: column whose value delimits a group, normally ``query_id``.
        order_by: column ranking rows within a group, ascending (lower is better).
        device: ``"cpu"`` (the default: a filter rarely pays for the copy to a GPU), ``"cuda"``
            or ``"auto"``. On CUDA the same Polars query runs on Polars' GPU engine
            (``cudf-polars``, ``pip install 'funnel-rank[gpu-filter]'``) with identical results;
            where that engine is missing or does not implement a rule's expression, the CPU
            engine runs it and a warning is logged once. ``"auto"`` sends only batches of at
            least :data:`stages.gpu_util.FILTER_GPU_MIN_ROWS` rows to the GPU engine.

    The output has exactly the input's columns and types, with some rows removed.
    """

    name = "filter.rules"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY)])
    tags = StageTags(devices=("cpu", "cuda"), level="candidate")

    def __init__(self, rules: list[dict] | None = None, dedupe_by: str | None = None, group_by: str = QUERY_ID,
                 order_by: str = RANK, device: str = "cpu"):
        self.rules = rules
        self.dedupe_by = dedupe_by
        self.group_by = group_by
        self.order_by = order_by
        self.device = device

    # -- parsing -----------------------------------------------------------------------------

    def _parse(self, leaves: list, *, load: bool) -> pl.Expr:
        """Check every rule and build their AND; append ``(where, rule, column, kind, literal)`` per leaf."""
        if self.rules is not None and not isinstance(self.rules, (list, tuple)):
            raise self._bad_param("rules", "a list of rule tables")
        exprs = [self._rule(rule, f"rule {i}", leaves, load) for i, rule in enumerate(self.rules or (), start=1)]
        return reduce(operator.and_, exprs) if exprs else pl.lit(True)

    def _rule(self, rule: Any, where: str, leaves: list, load: bool) -> pl.Expr:
        def bad(problem: str) -> ConfigError:
            return ConfigError(f"stage '{self.name}': {where} {_show(rule)}: {problem}")

        if not isinstance(rule, dict):
            raise bad("a rule must be a table such as {column = \"price\", op = \"lt\", value = 100}")
        if "any" in rule:
            allowed: tuple[str, ...] = ("any", "negate")
        elif "op" not in rule:
            raise bad(f"missing key 'op' (one of {', '.join(OPS)}), or write {{any = [rule, ...]}}")
        elif not isinstance(rule["op"], str) or rule["op"] not in OPS:
            raise bad(f"op {rule['op']!r} is not one of {', '.join(OPS)}")
        else:
            build, required, optional = OPS[rule["op"]]
            allowed = _COMMON + required + optional
        unknown = [k for k in rule if k not in allowed]
        if unknown:
            raise bad(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed keys here: {', '.join(allowed)}")
        if not isinstance(rule.get("negate", False), bool):
            raise bad("'negate' must be true or false")

        if "any" in rule:
            subs = rule["any"]
            if not isinstance(subs, list) or not subs:
                raise bad("'any' must be a non-empty list of rules")
            expr = reduce(operator.or_, [self._rule(s, f"{where}.{i}", leaves, load) for i, s in enumerate(subs, 1)])
            return ~expr if rule.get("negate") else expr

        op = rule["op"]
        for key in ("column",) + required:
            if key not in rule:
                raise bad(f"missing key '{key}'")
        column = rule["column"]
        if not isinstance(column, str) or not column:
            raise bad("'column' must be a column name")
        kind, literal, extra = None, None, {}
        if op in ("eq", "ne", "lt", "le", "gt", "ge", "contains"):
            literal = rule["value"]
            kind = _kind(literal)
            if kind is None or (op == "contains" and kind != "string"):
                raise bad(f"'value' must be {'text' if op == 'contains' else 'a boolean, number, text, date or time'}; got {literal!r}")
            if not isinstance(rule.get("ignore_case", False), bool):
                raise bad("'ignore_case' must be true or false")
        elif op == "between":
            literal = [rule[k] for k in ("min", "max") if k in rule]
            kinds = {_kind(v) for v in literal}
            if not literal:
                raise bad("'between' needs 'min', 'max' or both")
            if None in kinds or len(kinds) > 1:
                raise bad(f"'min' and 'max' must be numbers, texts or dates of the same kind; got {literal!r}")
            kind = kinds.pop()
            try:
                reversed_bounds = len(literal) == 2 and literal[0] > literal[1]
            except TypeError:
                raise bad(f"'min' and 'max' cannot be compared with each other: {literal!r}") from None
            if reversed_bounds:
                raise bad(f"'min' ({literal[0]!r}) is greater than 'max' ({literal[1]!r})")
        elif op in ("in", "not_in"):
            if ("values" in rule) == ("values_file" in rule):
                raise bad("missing key 'values' (a list), or 'values_file' (a file name); give exactly one")
            if "values" in rule:
                literal = rule["values"]
                kinds = {_kind(v) for v in literal} if isinstance(literal, list) else {None}
                if None in kinds or len(kinds) > 1:
                    raise bad(f"'values' must be a list of booleans, numbers, texts or dates, all of one kind; got {_show(literal, 80)}")
                kind = kinds.pop() if kinds else None
                extra = {"values": literal, "strict": False}
            else:
                extra = {"values": self._read_values(rule["values_file"], bad, load), "strict": True}
        expr = build(column, {**rule, **extra})
        leaves.append((where, rule, column, kind, literal))
        return ~expr if rule.get("negate") else expr

    def _read_values(self, name: Any, bad, load: bool) -> list[str]:
        if not isinstance(name, str) or not name:
            raise bad("'values_file' must be a file name")
        path = self.resolve_path(name)
        if not path.is_file():
            raise bad(f"values_file {str(path)!r} does not exist")
        if not load:
            return []
        lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
        return [line for line in lines if line and not line.startswith("#")]

    # -- contract ----------------------------------------------------------------------------

    def validate_params(self) -> None:
        super().validate_params()
        if self.dedupe_by is not None and (not isinstance(self.dedupe_by, str) or not self.dedupe_by):
            raise self._bad_param("dedupe_by", "a column name or None")
        for param, value in (("group_by", self.group_by), ("order_by", self.order_by)):
            if not isinstance(value, str) or not value:
                raise self._bad_param(param, "a column name")
        self._parse([], load=False)

    def _columns(self) -> list[str]:
        if getattr(self, "expr_", None) is not None:
            leaves = self.leaves_
        else:
            leaves = []
            self._parse(leaves, load=False)
        names = [leaf[2] for leaf in leaves]
        if self.dedupe_by is not None:
            names += [self.group_by, self.dedupe_by, self.order_by]
        return list(dict.fromkeys(names))

    def required_columns(self) -> pa.Schema:
        names = dict.fromkeys([QUERY_ID, *self._columns()])
        return pa.schema([pa.field(n, ANY) for n in names])

    def warm_up(self) -> None:
        super().warm_up()
        if getattr(self, "expr_", None) is None:
            self.leaves_ = []
            self.expr_ = self._parse(self.leaves_, load=True)

    def _check_types(self, df: pl.DataFrame, table: pa.Table) -> None:
        for where, rule, column, kind, literal in self.leaves_:
            dtype = df.schema[column]
            if kind is not None and dtype != pl.Null and not _FITS[kind](dtype):
                raise DataError(
                    f"stage '{self.name}': {where} {_show(rule)}: column '{column}' has type "
                    f"{table.schema.field(column).type}, which cannot be compared with the {kind} value {_show(literal, 80)}"
                )

    def transform(self, table: pa.Table) -> pa.Table:
        if getattr(self, "expr_", None) is None:
            self.warm_up()
        if not self._columns():
            return table
        try:
            # only the columns the rules read go to Polars; the rows kept are taken from the Arrow table
            df = pl.from_arrow(table.select(self._columns()))
            self._check_types(df, table)
            row = "__row__"
            while row in df.columns:
                row += "_"
            query = df.lazy().with_row_index(row).filter(self.expr_)
            if self.dedupe_by is not None:
                query = (query.sort(self.order_by, nulls_last=True, maintain_order=True)
                         .unique([self.group_by, self.dedupe_by], keep="first", maintain_order=True)
                         .sort(row))
            device = self.device_ if gpu_pays_off(self.device, table.num_rows, FILTER_GPU_MIN_ROWS) else "cpu"
            kept = collect(query.select(row), device=device, owner=self, what=f"stage '{self.name}'")[row]
        except pl.exceptions.PolarsError as exc:
            raise DataError(f"stage '{self.name}': the rules could not be applied to this batch: {exc}") from exc
        if len(kept) == table.num_rows:
            return table
        return take_rows(table, kept.to_arrow())
