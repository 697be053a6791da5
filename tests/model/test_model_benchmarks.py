"""The model benchmarks run end to end (`--quick`) and print their Markdown tables; nothing is timed."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench_train.py", "bench_mfu.py", "bench_memory.py"])
def test_benchmark_quick_run_prints_a_table(script):
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--threads", "1"],
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout
    assert "|---|" in out


@pytest.mark.slow
def test_mfu_benchmark_takes_dim_x_layers_shapes_and_packed_rows():
    """`bench_mfu.py --shapes 128x2 --docs 2`: a shape by its dimensions (heads of 64 dims), packed rows."""
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_mfu.py"), "--shapes", "128x2", "--docs", "2", "--precision", "fp32",
         "--batch", "2", "--seq-len", "32", "--vocab", "256", "--steps", "1", "--rounds", "1", "--peak-size", "256",
         "--threads", "1"],
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout
    assert "2 document(s) per row" in out
    (row,) = [line for line in out.splitlines() if line.startswith("| 128x2 |")]
    assert "| sdpa | fp32 | eager | 0.4M |" in row  # 2 layers x 12 x 128^2 = 0.39M outside the embedding table
