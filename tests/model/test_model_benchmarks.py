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
