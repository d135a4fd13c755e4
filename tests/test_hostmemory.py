"""runtime.keep_freed_memory: freed CPU memory is reused without page faults (glibc only)."""

import subprocess
import sys

import pytest

# Four 320 KiB blocks allocated, touched and freed, 50 times: under glibc's defaults the freed
# heap top is trimmed and re-faulted every time; kept, the same pages serve every round.
PROBE = """
import ctypes, ctypes.util, resource, sys
from dmeta.hostmemory import keep_freed_memory
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        blocks = [libc.malloc(320 * 1024) for _ in range(4)]
        for block in blocks:
            ctypes.memset(block, 1, 320 * 1024)
        for block in blocks:
            libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
before = faults()
kept = keep_freed_memory()
faults()  # the first round after the change may still grow the heap
print(before, kept, faults())
"""


def test_kept_memory_is_reused_without_page_faults():
    if not sys.platform.startswith("linux"):
        pytest.skip("mallopt is glibc's: Linux only")
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    )
    before, kept, after = result.stdout.split()
    if kept != "True":
        pytest.skip("the C library is not glibc or refused mallopt")
    assert int(before) > 1000  # glibc's defaults: each round re-faults most of its 1.25 MiB
    assert int(after) < 10
