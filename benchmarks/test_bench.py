"""pytest-benchmark view of the same providers: `pytest benchmarks/ --benchmark-only`.

The sweep (benchmarks/sweep.py) is the record with ratios measured side by side; this runs the
same cases under pytest-benchmark's calibration, for comparing runs with --benchmark-compare.
"""

from __future__ import annotations

import pytest
import torch

from bandadv.bench import Case, make_inputs, providers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [Case(512, 16), Case(2048, 16, ragged=True), Case(1024, 64), Case(1 << 18, 16)]


def _params():
    for case in CASES:
        for name in providers(DEVICE, case):
            if name != "verl-loop":
                yield pytest.param(case, name, id=f"{case.name.replace(' ', '-')}-{name}")


@pytest.mark.parametrize("case,provider", list(_params()))
def test_provider(benchmark, case, provider):
    inputs = make_inputs(case, DEVICE, seed=0)
    _, fn = providers(DEVICE, case)[provider]

    def run():
        fn(inputs)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = case.name
    benchmark(run)
