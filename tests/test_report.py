"""_report.py: report.md and the plots are written atomically (issue 13 fault injection)."""
import os

import matplotlib.figure
import pytest
from _faults import InjectedFault, inject, leftovers, snapshot

from laco_kernels._report import write_report


def _result():
    return {"model": "tiny", "method": "wanda", "pattern": "2:4", "sparsity": 0.5, "calibration": [4, 16],
            "eval": {"seqlen": 16, "max_windows": 2}, "ppl": {"dense": 10.0, "pruned": 20.0, "recovered": 15.0},
            "prune": {"overall_sparsity": 0.5, "block_error": [0.1, 0.2, 0.4]},
            "recovery": {"method": "layerwise", "seconds": 3.0,
                         "blocks": [{"nmse_before": 0.3, "nmse_after": 0.1}, {"nmse_before": 0.5, "nmse_after": 0.2}]},
            "saved": {"swapped": 0}, "seconds": {"load": 1.0}, "total_seconds": 2.0}


def test_report_written(tmp_path):
    path = write_report(str(tmp_path), _result())
    assert sorted(os.listdir(tmp_path)) == ["block_error.png", "recovery_error.png", "report.md"]
    text = open(path).read()
    assert "closed 50%" in text and "over the recovery calibration set" in text


def test_report_names_the_windows_the_block_errors_were_measured_on(tmp_path):
    r = _result()
    for b in r["recovery"]["blocks"]:
        b["error_samples"] = 8
    text = open(write_report(str(tmp_path), r)).read()
    assert "over the first 8 windows of the recovery calibration set" in text


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("fault", [("savefig", 1), ("savefig", 2), ("replace", 1), ("replace", 2), ("replace", 3),
                                   ("fsync", 3)])
def test_report_fault_keeps_each_file_old_or_absent(tmp_path, monkeypatch, existing, fault):
    if existing:
        write_report(str(tmp_path), _result())
    before = snapshot(str(tmp_path))
    target = matplotlib.figure.Figure if fault[0] == "savefig" else os
    inject(monkeypatch, target, fault[0], fault[1])
    r = _result()
    r["ppl"]["recovered"] = 12.0
    with pytest.raises(InjectedFault):
        write_report(str(tmp_path), r)
    monkeypatch.undo()
    after = snapshot(str(tmp_path))
    assert leftovers(tmp_path) == []
    for name, data in after.items():  # each file is the old one or a complete new one
        assert name in ("block_error.png", "recovery_error.png", "report.md")
        if name == "report.md":
            assert data == before.get(name), "report.md changed by a failed write"
        else:
            assert data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82")
