"""``features.price_band``: the band a candidate's price falls in, on CPU (NumPy) or CUDA (torch)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import DataError, Stage, StageTags

__all__ = ["PriceBandFeature"]


class PriceBandFeature(Stage):
    """Add the band each candidate's price falls in, as an int32 column.

    With ``edges = [e1, ..., en]``, band 0 is ``price < e1``, band i is ``e_i <= price < e_i+1``
    and band n is ``price >= en``. A null price gives a null band. A NaN or negative price
    cannot be banded: ``funnel run`` sets such rows aside in its quarantine file with the
    reason; under ``--strict`` (or when the stage is called directly) it raises ``DataError``.

    The CUDA path (``device = "cuda"``, or ``"auto"`` when torch sees a GPU) bands with
    ``torch.bucketize`` and gives exactly the CPU's bands, which the conformance kit's
    ``cpu_gpu_parity`` check proves on a CUDA machine. For per-row work this small the CPU is
    faster, hence the default; the path is here to show how a stage carries one.

    Args:
        edges: band edges, strictly increasing numbers (at least one).
        price_column: the numeric column holding the price.
        output_column: the int32 column written; name it ``f_price_band`` to have
            ``rank.lightgbm`` train on it.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    name = "features.price_band"
    input_schema = pa.schema([pa.field("price", pa.float64())])
    output_schema = pa.schema([pa.field("price_band", pa.int32())])
    tags = StageTags(devices=("cpu", "cuda"), level="candidate")

    def __init__(self, edges: list[float] | tuple[float, ...] = (25.0, 50.0, 100.0, 250.0, 500.0),
                 price_column: str = "price", output_column: str = "price_band", device: str = "cpu"):
        self.edges = edges
        self.price_column = price_column
        self.output_column = output_column
        self.device = device

    def validate_params(self) -> None:
        super().validate_params()
        edges = self.edges
        numbers = isinstance(edges, (list, tuple)) and all(
            isinstance(e, (int, float)) and not isinstance(e, bool) and np.isfinite(e) for e in edges)
        if not numbers or not edges or any(a >= b for a, b in zip(edges, edges[1:])):
            raise self._bad_param("edges", "a non-empty list of strictly increasing finite numbers")
        for param in ("price_column", "output_column"):
            if not isinstance(getattr(self, param), str) or not getattr(self, param):
                raise self._bad_param(param, "a column name")

    def required_columns(self) -> pa.Schema:
        return pa.schema([pa.field(self.price_column, pa.float64())])

    def produced_columns(self) -> pa.Schema:
        return pa.schema([pa.field(self.output_column, pa.int32())])

    def warm_up(self) -> None:
        super().warm_up()
        if getattr(self, "edges_", None) is not None:
            return
        if self.device_ == "cuda":
            import torch

            self.edges_ = torch.tensor(self.edges, dtype=torch.float64, device="cuda")
        else:
            self.edges_ = np.asarray(self.edges, dtype=np.float64)

    def invalid_rows(self, table: pa.Table) -> pa.Array | None:
        price = pc.cast(table.column(self.price_column), pa.float64())
        none = pa.scalar(None, pa.string())
        reasons = pc.if_else(pc.is_nan(price), f"{self.price_column} is NaN",
                             pc.if_else(pc.less(price, 0), f"{self.price_column} is negative", none))
        reasons = reasons.combine_chunks() if isinstance(reasons, pa.ChunkedArray) else reasons
        return None if reasons.null_count == len(reasons) else reasons

    def bands(self, prices: np.ndarray) -> np.ndarray:
        """Band of each price (float64 array without NaN), where ``edges_`` lives: NumPy or a torch device."""
        if isinstance(self.edges_, np.ndarray):
            return np.searchsorted(self.edges_, prices, side="right").astype(np.int32)
        import torch

        found = torch.bucketize(torch.from_numpy(prices).to(self.edges_.device), self.edges_, right=True)
        return found.cpu().numpy().astype(np.int32)

    def transform(self, table: pa.Table) -> pa.Table:
        reasons = self.invalid_rows(table)
        if reasons is not None:
            first = pc.index(pc.is_valid(reasons), True).as_py()
            raise DataError(
                f"stage '{self.name}': column '{self.price_column}' must hold prices >= 0 or null; "
                f"found {len(reasons) - reasons.null_count} row(s) that are not (first at row {first}: {reasons[first]})")
        price = pc.cast(table.column(self.price_column), pa.float64())
        missing = price.is_null().to_numpy(zero_copy_only=False)
        prices = np.nan_to_num(price.to_numpy(zero_copy_only=False), nan=0.0)
        column = pa.array(self.bands(prices), type=pa.int32(), mask=missing)
        field = pa.field(self.output_column, pa.int32())
        idx = table.schema.get_field_index(self.output_column)
        return table.set_column(idx, field, column) if idx >= 0 else table.append_column(field, column)
