"""Peak resident memory of this process above a baseline (Linux), for recovery memory figures.

``reset_peak()`` writes 5 to ``/proc/self/clear_refs``, which resets the kernel's high-water mark
of the resident set (``VmHWM``) to the current resident set; ``peak_above_baseline()`` then reads
``VmHWM`` minus that baseline. This is exact (the kernel tracks it), unlike sampling, and unlike
``ru_maxrss`` it is not inherited from a large parent across fork + exec.
"""
from __future__ import annotations

from typing import Dict


def _status() -> Dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) * 1024
    return out


class PeakMemory:
    """``m = PeakMemory()`` right after the imports (baseline), ``m.peak_above_baseline()`` at the end."""

    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError as e:
            raise RuntimeError(f"cannot reset the peak resident set (/proc/self/clear_refs: {e}); "
                               "this measurement needs Linux >= 4.0") from e
        self.baseline = _status()["VmRSS"]

    def peak_above_baseline(self) -> int:
        """Bytes: kernel high-water mark of the resident set since construction, minus the baseline."""
        return _status()["VmHWM"] - self.baseline
