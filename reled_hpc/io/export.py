"""Export a dump's groups as flat tables: Parquet (pyarrow) or CSV (pandas), for tools that know no HDF5.

Every 2-D column becomes one column per feature (`obs.<feature name>`, `action_mask.<candidate>`),
booleans stay booleans, strings are str, and only committed iterations are written. Rows are streamed
`chunk_rows` at a time through TrajectoryReader.iter_chunks, so the dump never has to fit in memory.
Units and descriptions travel with the data: Parquet keeps them as field metadata (`units`,
`description`), CSV in a sidecar JSON file (`<name>.units.json`), because a comment line in the CSV
would have to be skipped by every reader and `comment="#"` would also cut program texts holding '#'.
The output appears only once complete (written to a temporary name, then renamed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DumpError
from . import schema as S
from .reader import TrajectoryReader

FORMATS: tuple[str, ...] = ("parquet", "csv")
UNITS_SUFFIX = ".units.json"  # CSV sidecar: agent.csv -> agent.units.json
CHUNK_ROWS = 65536  # rows per chunk: 64k rows of every agent/ column are ~12 MB


@dataclass(frozen=True)
class FlatColumn:
    """One column of the exported table: `source` column of the dump, `index` into its 2-D trailing axis."""

    name: str
    source: str
    index: int | None
    units: str
    description: str


@dataclass(frozen=True)
class ExportResult:
    path: Path
    units_path: Path | None  # CSV sidecar
    rows: int
    columns: int


def flat_columns(reader: TrajectoryReader, group: str) -> list[FlatColumn]:
    """The exported table's columns of `group`: the dump's columns, 2-D ones spread out per feature."""
    units, descriptions = reader.units(group), reader.descriptions(group)
    out: list[FlatColumn] = []
    for name in reader.columns(group):
        col = S.ROW_COLUMN_BY_NAME.get(name) if group in S.ROW_GROUPS else None
        if col is not None and col.trailing:
            for j, feature in enumerate(reader.feature_names(group, name)):
                out.append(FlatColumn(f"{name}.{feature}", name, j, units[name], descriptions[name]))
        else:
            out.append(FlatColumn(name, name, None, units[name], descriptions[name]))
    return out


def _chunks(reader: TrajectoryReader, group: str, chunk_rows: int) -> Iterator[dict[str, np.ndarray]]:
    if group == S.METRICS_GROUP:  # one row per iteration: small
        m = reader.metrics()
        for lo in range(0, reader.n_rows(group), chunk_rows):
            yield {k: v[lo : lo + chunk_rows] for k, v in m.items()}
    else:
        yield from reader.iter_chunks(group, chunk_rows=chunk_rows)


def _flat(chunk: dict[str, np.ndarray], cols: list[FlatColumn]) -> dict[str, np.ndarray]:
    return {c.name: chunk[c.source] if c.index is None else chunk[c.source][:, c.index] for c in cols}


def _arrow_type(dtype: np.dtype) -> Any:
    import pyarrow as pa

    return pa.string() if dtype.kind == "O" else pa.from_numpy_dtype(dtype)


def _column_dtype(group: str, source: str) -> np.dtype:
    if group == S.METRICS_GROUP:
        return S.METRIC_ITERATION_DTYPE if source == "iteration" else np.dtype(np.float64)
    by_name = S.PROGRAM_COLUMN_BY_NAME if group == S.PROGRAMS_GROUP else S.ROW_COLUMN_BY_NAME
    dt = by_name[source].dtype
    return np.dtype(object) if dt == S.VLEN_STR else dt


def _file_metadata(reader: TrajectoryReader, group: str) -> dict[str, str]:
    return {
        "reled_hpc.dump": str(reader.path),
        "reled_hpc.group": group,
        "reled_hpc.schema_version": str(reader.schema_version),
        "reled_hpc.committed_iterations": str(len(reader.iterations())),
    }


def export_group(
    reader: TrajectoryReader, group: str, fmt: str, out: str | Path, chunk_rows: int = CHUNK_ROWS
) -> ExportResult:
    """Write the committed rows of `group` to `out` as `fmt` ("parquet" or "csv"); see the module doc."""
    if fmt not in FORMATS:
        raise DumpError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if group not in S.ALL_GROUPS:
        raise DumpError(f"unknown group {group!r}; choose one of {', '.join(S.ALL_GROUPS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    rows = 0
    try:
        cols = flat_columns(reader, group)
        if fmt == "parquet":
            rows = _write_parquet(reader, group, cols, tmp, chunk_rows)
        else:
            rows = _write_csv(reader, group, cols, tmp, chunk_rows)
        os.replace(tmp, out)
    except (OSError, RuntimeError, ValueError) as exc:
        # a damaged chunk met mid-stream (h5py raises OSError/RuntimeError), or the output could not be written
        raise DumpError(f"{reader.path}: exporting {group}/ failed after {rows} rows ({exc}); nothing written "
                        f"to {out}") from exc  # fmt: skip
    finally:
        tmp.unlink(missing_ok=True)
    units_path = None
    if fmt == "csv":
        units_path = out.with_suffix(UNITS_SUFFIX)
        meta = {**_file_metadata(reader, group), "columns": {c.name: {"units": c.units, "description": c.description}
                                                             for c in cols}}  # fmt: skip
        units_path.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return ExportResult(out, units_path, rows, len(cols))


def _write_parquet(reader: TrajectoryReader, group: str, cols: list[FlatColumn], path: Path, chunk_rows: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [
        pa.field(c.name, _arrow_type(_column_dtype(group, c.source)),
                 metadata={"units": c.units, "description": c.description})
        for c in cols
    ]  # fmt: skip
    schema = pa.schema(fields, metadata=_file_metadata(reader, group))
    rows = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as w:
        for chunk in _chunks(reader, group, chunk_rows):
            flat = _flat(chunk, cols)
            arrays = [pa.array(flat[f.name], type=f.type) for f in fields]
            w.write_table(pa.Table.from_arrays(arrays, schema=schema))
            rows += len(arrays[0]) if arrays else 0
    return rows


def _write_csv(reader: TrajectoryReader, group: str, cols: list[FlatColumn], path: Path, chunk_rows: int) -> int:
    import pandas as pd

    rows = 0
    with open(path, "w", encoding="utf-8", newline="") as fh:
        pd.DataFrame(columns=[c.name for c in cols]).to_csv(fh, index=False)  # the header, also for no rows
        for chunk in _chunks(reader, group, chunk_rows):
            df = pd.DataFrame(_flat(chunk, cols), copy=False)
            df.to_csv(fh, index=False, header=False)
            rows += len(df)
    return rows


def default_output(folder: str | Path, group: str, fmt: str) -> Path:
    """`<folder>/<group>.<fmt>`."""
    return Path(folder) / f"{group}.{fmt}"
