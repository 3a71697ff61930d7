"""`mnet bench --quick --json` reports every row with positive times (in-process, through the command line's own
entry point)."""

import json

from tests.helpers import run_mnet


def test_bench_quick_json():
    result = run_mnet("bench", "--quick", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["matmul_peak_gflops"] > 0 and data["machine"]["backend"]
    names = {row["name"] for row in data["rows"]}
    assert {
        "W1",
        "W1bf16",
        "W2",
        "W3",
        "D1",
        "D2",
        "D3",
        "D3w",
        "D4",
        "C1",
        "T1",
        "G1",
        "G2",
        "G3",
        "G4",
        "M1-256",
    } <= names
    for row in data["rows"]:
        assert row["seconds"] and all(s > 0 for s in row["seconds"].values()), row
        assert row["ratios"][row["baseline"]] == 1.0
        # XLA's memory analysis beside every time: positive figures for every compiled contender, "n/a" only for
        # a loop of programs (never a zero standing in for a missing analysis)
        assert set(row["memory"]) == set(row["seconds"]), row
        for name, memory in row["memory"].items():
            if name.endswith("loop"):
                assert set(memory.values()) == {"n/a"}, (row["name"], name)
            else:
                assert memory["temp_bytes"] > 0 and memory["peak_bytes"] > memory["temp_bytes"], (row["name"], name)
        # XLA's flop count beside every compiled contender's time, and the work as a multiple of the baseline's
        assert set(row["flops"]) == set(row["work"]) == set(row["seconds"]), row
        counted = {name for name, flops in row["flops"].items() if flops != "n/a"}
        assert all(row["flops"][name] > 0 for name in counted), row
        if row["baseline"] in counted:
            assert row["work"][row["baseline"]] == 1.0
            assert all(row["work"][name] == row["flops"][name] / row["flops"][row["baseline"]] for name in counted)


def test_bench_bad_row_name_is_one_line():
    result = run_mnet("bench", "--quick", "--rows", "W9")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "W9" in result.stderr


def test_throughput_is_set_against_the_peak_of_its_own_dtype():
    """Defect 7: a bfloat16 row was divided by the float32 peak (145% "of peak")."""
    from mnet.bench.suite import contender_figures, format_table

    row = {
        "name": "W1bf16",
        "description": "training step",
        "seconds": {"hand": 0.01},
        "ratios": {"hand": 1.0},
        "extra": {"gflops_per_s": {"hand": 145.0}, "peak_dtype": "bfloat16"},
        "memory": {"hand": {"temp_bytes": 10**6, "peak_bytes": 2 * 10**6}},
    }
    peaks = {"float32": 100.0, "bfloat16": 290.0}
    assert contender_figures(row, "hand", peaks)[1] == "145.0 GFLOP/s = 50% of the bfloat16 peak"
    result = {
        "machine": {"processor": "x86_64", "cpu_count": 2, "backend": "cpu", "jax": "0"},
        "matmul_peak_gflops": 100.0,
        "matmul_peak_gflops_by_dtype": peaks,
        "rows": [row],
    }
    table = format_table(result)
    assert "bfloat16 peak 290.0 GFLOP/s" in table.splitlines()[0]
    assert all("W1bf16training" not in line for line in table.splitlines())
