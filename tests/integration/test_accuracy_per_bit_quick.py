"""Smoke run of benchmarks/accuracy_per_bit.py --quick (float32, fixed and fedmpq on the
paper's budgets, 3 rounds of an MLP): FedMPQ drops planes, its allocations are mixed, and
its weights stay as large as fixed precision's."""

import json

import pytest

from benchmarks.accuracy_per_bit import WIRE_BUDGETS, main


def test_quick_benchmark_shows_fedmpq_adapting(tmp_path, capsys):
    main(["--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "accuracy_per_bit_quick.json").read_text())
    rows = {r["policy"]: r for r in result["table"]}
    assert set(rows) == {"float32", "fixed", "fedmpq"}
    for row in rows.values():
        assert row["final_acc"] > 0.3  # every policy learned something in 3 rounds
        # A round lasts as long as its slowest client's compute + download + upload.
        assert sum(row["round_parts_s"]) == pytest.approx(row["round_s"])
        assert min(row["round_parts_s"]) > 0
    assert (
        rows["fixed"]["sent_bits"] < 8
        and rows["fixed"]["uplink_mb"] < rows["float32"]["uplink_mb"] / 4
    )
    fedmpq = next(r for r in result["runs"] if r["run"]["policy"] == "fedmpq")
    assert sum(rows["fedmpq"]["planes_dropped"]) > 0  # planes drop
    last = fedmpq["history"][-1]["allocated_bits"]
    # Some client's allocation is mixed: its layers differ in bits...
    assert any(len(set(bits.values())) > 1 for bits in last.values())
    # ...and differs from its uniform budget.
    budgets = dict(zip(sorted(last), WIRE_BUDGETS, strict=True))
    assert any(set(bits.values()) != {int(budgets[c])} for c, bits in last.items())
    norms = result["norm_ratios"]["fedmpq a=0.5 s=0"]
    assert 1 / 1.2 <= norms["min"] <= norms["max"] <= 1.2
    assert result["client_cost"]["cpu_s"]["fedmpq"] > 0
    assert "| fedmpq |" in (tmp_path / "accuracy_per_bit_quick.md").read_text()
    assert "uplink" in capsys.readouterr().out
