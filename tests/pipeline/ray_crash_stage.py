"""A test-only stage that kills its own process once, to test Ray actor restarts and retries.

Importing this module registers ``debug.crash_once`` (in every process that imports it: the
Ray engine's ``imports=`` makes its actors do so). The stage passes batches through unchanged,
except that the first batch containing query ``on_query`` while the file ``marker`` exists
deletes the marker and ends the process with ``os._exit(1)`` — a crash, not an exception, so
Ray sees a dead actor. Deleting the marker first makes it crash exactly once across processes.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import Stage, StageTags, register_stage


@register_stage
class CrashOnce(Stage):
    name = "debug.crash_once"
    tags = StageTags(level="candidate")

    def __init__(self, marker: str = "", on_query: int = 0):
        self.marker = marker
        self.on_query = on_query

    def transform(self, table: pa.Table) -> pa.Table:
        hit = pc.any(pc.equal(table.column("query_id"), self.on_query)).as_py()
        if self.marker and hit and os.path.exists(self.marker):
            try:
                os.unlink(self.marker)
            except FileNotFoundError:
                return table
            os._exit(1)
        return table
