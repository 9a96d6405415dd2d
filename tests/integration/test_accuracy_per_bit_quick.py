"""Smoke run of benchmarks/accuracy_per_bit.py --quick (every policy, both budget
settings, 3 rounds of an MLP; well under 5 minutes on 2 cores)."""

import json

from benchmarks.accuracy_per_bit import main


def test_quick_benchmark_writes_a_complete_table(tmp_path, capsys):
    main(["--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "accuracy_per_bit_quick.json").read_text())
    rows = result["table"]
    seen = {(r["setting"], r["policy"]) for r in rows}
    for policy in ("fixed", "qsgd", "fedlq", "fedmpq"):
        assert {("hetero", policy), ("uniform4", policy)} <= seen
    assert ("hetero", "float32") in seen
    for row in rows:
        assert row["final_acc"] > 0.3  # every policy learned something in 3 rounds
        if row["policy"] != "float32":
            assert row["uplink_reduction"] > 4.0  # quantized updates are far smaller
    assert "| fedmpq |" in (tmp_path / "accuracy_per_bit_quick.md").read_text()
    assert "uplink" in capsys.readouterr().out
