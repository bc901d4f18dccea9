"""benchmarks.common.peak_memory_in_subprocess measures the child alone.

Linux keeps ``ru_maxrss`` across fork + exec, so a child spawned by a large parent used to start
with the parent's peak: its reported peak was the parent's and its growth read as zero.
"""

import resource
import sys

import pytest

from moe_framework.benchmarks import common

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux only")


def test_child_peak_is_not_the_parents():
    # Make this process's peak much larger than the child will ever be.
    hog = bytearray(600 * 2**20)
    hog[::4096] = b"\x01" * len(range(0, len(hog), 4096))
    parent_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        out = common.peak_memory_in_subprocess(
            "moe_framework.benchmarks.common:touch_memory", timeout=120, mb=64
        )
    finally:
        del hog
    assert out["peak_source"] == "VmHWM"
    assert out["extra"] == {"mb": 64}
    # The call's growth is the 64 MiB it touched (plus a little for the allocator).
    assert 56 <= out["delta_rss_mb"] <= 96, out
    # The child's peak is its own: far below the parent's (which holds >= 600 MiB).
    assert out["peak_rss_mb"] < parent_peak_mb - 300, (out, parent_peak_mb)
