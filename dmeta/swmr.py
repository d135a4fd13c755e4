"""HDF5's single-writer/multiple-reader mode (SWMR) for run files.

A run file is created with the v110 format bounds: superblock version 3, the oldest format
that SWMR accepts (HDF5 1.10 and later read it). The serial writer switches the file to SWMR
mode once its header datasets exist; readers then open it with
`h5py.File(path, "r", swmr=True)` and see every flushed row while the run goes on.

HDF5 marks such a file "open for writing" in its superblock's status flags until the writer
closes it. A writer that was killed leaves them set, and HDF5 then refuses to open the file
for writing (SWMR readers still can); a resume clears them as `h5clear -s` does. Imports only
h5py: no torch, no mpi4py.
"""

from __future__ import annotations

import os
import struct

import h5py

# The format bounds of a run file written by the serial writer.
LIBVER = ("v110", "latest")
SIGNATURE = b"\x89HDF\r\n\x1a\n"
SWMR_WRITE = 0x04  # superblock status flag: a SWMR writer has the file open
_MASK = 0xFFFFFFFF


def _rotate(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    for shift_a, shift_b, shift_c in ((4, 6, 8), (16, 19, 4)):
        a = ((a - c) & _MASK) ^ _rotate(c, shift_a)
        c = (c + b) & _MASK
        b = ((b - a) & _MASK) ^ _rotate(a, shift_b)
        a = (a + c) & _MASK
        c = ((c - b) & _MASK) ^ _rotate(b, shift_c)
        b = (b + a) & _MASK
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c = ((c ^ b) - _rotate(b, 14)) & _MASK
    a = ((a ^ c) - _rotate(c, 11)) & _MASK
    b = ((b ^ a) - _rotate(a, 25)) & _MASK
    c = ((c ^ b) - _rotate(b, 16)) & _MASK
    a = ((a ^ c) - _rotate(c, 4)) & _MASK
    b = ((b ^ a) - _rotate(a, 14)) & _MASK
    return ((c ^ b) - _rotate(b, 24)) & _MASK


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 hash (hashlittle) of `data`: the checksum of HDF5's metadata."""
    a = b = c = (0xDEADBEEF + len(data) + initval) & _MASK
    while len(data) > 12:
        x, y, z = struct.unpack_from("<3I", data)
        a, b, c = _mix((a + x) & _MASK, (b + y) & _MASK, (c + z) & _MASK)
        data = data[12:]
    if not data:
        return c
    x, y, z = struct.unpack("<3I", data.ljust(12, b"\0"))
    return _final((a + x) & _MASK, (b + y) & _MASK, (c + z) & _MASK)


def superblock(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(version, status flags) of the superblock at the start of an HDF5 file; (-1, 0) when
    the file does not start with one. Flags exist from version 2 on (0 before)."""
    with open(path, "rb") as file:
        head = file.read(12)
    if len(head) < 12 or head[:8] != SIGNATURE:
        return -1, 0
    return head[8], head[11] if head[8] >= 2 else 0


def recover(path: str | os.PathLike[str]) -> None:
    """Make the file of a killed writer writable again, as `h5clear -s` does: the superblock's
    status flags cleared and the end of file it records raised to the file's size (a SWMR
    writer records it only when it closes), with the checksum recomputed. A file without
    flags set is left as it is."""
    version, flags = superblock(path)
    if version < 2 or not flags:
        return
    size = os.path.getsize(path)
    with open(path, "r+b") as file:
        block = bytearray(file.read(12))
        width = block[9]  # bytes per address: base, extension, end of file, root group
        block += file.read(4 * width)
        where = 12 + 2 * width
        end = int.from_bytes(block[where : where + width], "little")
        block[where : where + width] = max(end, size).to_bytes(width, "little")
        block[11] = 0
        file.seek(0)
        file.write(bytes(block) + struct.pack("<I", lookup3(bytes(block))))


def open_for_reading(path: str | os.PathLike[str]) -> h5py.File:
    """Open a run file to read, complete or still being written, taking no file lock (a
    reader never blocks the writer); raises OSError. SWMR mode only while the superblock says
    a SWMR writer has the file (or had, and was killed): SWMR readers take a bad checksum for
    a write in progress and retry it for hours, so a damaged file must be read plainly."""
    writing = bool(superblock(path)[1] & SWMR_WRITE)
    return h5py.File(path, "r", swmr=writing, locking=False)


def being_written(error: OSError) -> bool:
    """Whether opening a file failed because a writer (live, or killed) holds it outside SWMR
    mode: setting a run up, writing its final datasets, or a run of an older format."""
    return "already open for write" in str(error)
