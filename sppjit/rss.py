"""A process's own peak resident set, for the measurements that report memory.

``getrusage``'s ``ru_maxrss`` (and the rusage ``wait4`` gives for a child) is not it for a
process started by exec on Linux: the kernel keeps there the larger of the peaks of the old
and the new address space, and the old one is the parent's, shared or copied at the fork.
A child of a test or bench process that compiled the kernels (about 2 GB) would report the
parent's figure. ``VmHWM`` in /proc/self/status is the peak of this address space alone.
"""

from __future__ import annotations


def own_peak_rss() -> int:
    """This process's peak resident set in bytes (VmHWM; elsewhere than Linux, ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
