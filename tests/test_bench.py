"""The benchmark harness: what its timings rest on.

bench/step.py compares an optimizer that allocates large temporaries at every step (torch AdamW
foreach) with ones that do not. Its timings hold only if those temporaries come from memory the
process already has, not from fresh pages faulted in at every step (keep_freed_memory).
"""
import os
import subprocess
import sys
import textwrap

import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench")

# In a process of its own (mallopt changes the allocator for the rest of the process): a block
# larger than 2 GiB from glibc's malloc (where torch's CPU tensors come from), filled and freed three
# times, as a step's temporaries are. Printed: how the allocator was left, and the minor page faults
# of each fill.
REUSE = textwrap.dedent("""
    import ctypes, resource, sys
    sys.path.insert(0, sys.argv[1])
    from step import keep_freed_memory
    print(keep_freed_memory())
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def faults_of_a_fill(nbytes):
        block = libc.malloc(nbytes)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ctypes.memset(block, 1, nbytes)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        libc.free(block)
        return faults

    nbytes = 9 * 2**28                                  # 2.25 GiB
    print(*(faults_of_a_fill(nbytes) for _ in range(3)))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_keeps_a_free_block_over_2_gib():
    # A free top over 2 GiB was handed back to the system with M_TRIM_THRESHOLD at 2**31 - 1, so
    # every later step faulted its temporaries in again (TinyLlama's shapes with 16 layers: 525,794
    # faults a step); -1 disables trimming altogether.
    out = subprocess.run([sys.executable, "-c", REUSE, BENCH], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    if out[0] != "glibc keeps freed memory":
        pytest.skip(f"not glibc: {out[0]}")
    first, *later = (int(x) for x in out[1].split())
    pages = 9 * 2**28 // 4096
    assert first > pages // 2           # the first fill faults its pages in (4 KiB or larger)...
    assert max(later) < pages // 100, f"the freed block was handed back: {later} faults on the later fills"


def test_by_shape_times_each_matrix_shape_of_the_preset():
    # one layer of the CPU preset: 8000 x 512 (the embedding and the head), 512 x 512, 128 x 512,
    # 1408 x 512 and 512 x 1408, each timed alone against torch AdamW
    out = subprocess.run([sys.executable, os.path.join(BENCH, "step.py"), "--layers", "1", "--steps", "1",
                          "--warmup", "1", "--only", "torch,MLorc_Lion r=4 pure", "--by-shape"],
                         capture_output=True, text=True, check=True,
                         env=dict(os.environ, MLORC_EXTENSION="0")).stdout
    assert "preset cpu, layers=1: 12 tensors" in out
    table = out[out.index("by shape:"):].splitlines()[2:]
    rows = {line.split()[0]: line.split() for line in table if line.strip()}
    assert set(rows) == {"8000x512", "512x512", "128x512", "1408x512", "512x1408"}
    assert rows["8000x512"][1] == "2" and rows["512x512"][1] == "2" and rows["1408x512"][1] == "2"
    for cells in rows.values():
        assert cells[4] == "1.00x"                     # torch AdamW against itself
        assert float(cells[-1].rstrip("x")) > 0        # MLorc_Lion's ratio, printed
