"""HDF5 global heap collections (where variable-length strings live) checked before HDF5 reads them.

The global heap is the one piece of metadata HDF5 reads without a checksum, and damage to it can make
HDF5 loop forever (see `heap_problem`). Shared by the reader (the attribute heap of every dump it
opens) and salvage (every collection of a cut or damaged file).
"""

from __future__ import annotations

import mmap
from pathlib import Path

GCOL_SIGNATURE = b"GCOL\x01\x00\x00\x00"  # a global heap collection, version 1 (reserved bytes zero)
GCOL_HEADER_BYTES = 16  # signature, version, reserved, collection size (8-byte lengths; the only size h5py writes)
# The file attributes' strings (config, versions) are stored when the writer creates the file, so
# their collection starts within the first few kB; scanning this much costs nothing at any file size.
ATTRIBUTE_HEAP_SCAN_BYTES = 1 << 20


def heap_problem(image: bytes) -> str | None:
    """Why HDF5 would not finish parsing this global heap collection image, None if it would.

    HDF5 (up to 2.0 at least) walks a collection's objects with `p = begin + need`, where a free-space
    object (index 0) needs its own size: an index-0 object of size 0, i.e. zeros (bytes past a cut, a
    zeroed block), never advances and the reader spins forever. The global heap has no checksum, so
    nothing else stops it. Objects running past the collection's end are refused too (pointer overflow).
    """
    end = len(image)
    p = GCOL_HEADER_BYTES
    while p + GCOL_HEADER_BYTES <= end:  # a shorter tail is free space to HDF5
        idx = int.from_bytes(image[p : p + 2], "little")
        size = int.from_bytes(image[p + 8 : p + 16], "little")
        need = GCOL_HEADER_BYTES + (size + 7) // 8 * 8 if idx else size
        if need == 0:
            return f"an empty free-space record at offset {p} (zeros) would make HDF5 loop forever"
        if need > end - p:
            return f"object {idx} at offset {p} claims {size:,} bytes, past the collection's end"
        p += need
    return None


def leading_heap_problems(path: str | Path, scan_bytes: int = ATTRIBUTE_HEAP_SCAN_BYTES) -> list[tuple[int, str]]:
    """(offset, why) of each global heap collection starting in the file's first `scan_bytes` that HDF5
    could not parse in bounded time: the attribute heap that every open reads. Collections that do not
    fit in the file are left to the truncation checks (a cut file)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return []
    bad: list[tuple[int, str]] = []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mm:
        at = mm.find(GCOL_SIGNATURE, 0, min(size, scan_bytes))
        while at >= 0:
            coll = int.from_bytes(mm[at + 8 : at + 16], "little") if at + GCOL_HEADER_BYTES <= size else 0
            if coll >= 2 * GCOL_HEADER_BYTES and at + coll <= size:
                why = heap_problem(mm[at : at + coll])
                if why:
                    bad.append((at, why))
            at = mm.find(GCOL_SIGNATURE, at + 1, min(size, scan_bytes))
    return bad
