"""Full benchmark sweep: every backend on this machine against the trainers' advantage code.

    python benchmarks/sweep.py [--device cpu|cuda] [--quick] [--out DIR]

Writes one JSON file per run, named after the machine and the date, and prints the table.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))  # run from a checkout too

from bandadv.bench import Case, format_table, machine_name, run_case, run_tracker, save

CASES = (
    Case(64, 8),
    Case(512, 16),
    Case(2048, 16),
    Case(1024, 64),
    Case(256, 512),
    Case(2048, 16, ragged=True),
    Case(1 << 20, 16),
)
QUICK_CASES = (Case(512, 16), Case(2048, 16, ragged=True), Case(1 << 20, 16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the three headline cases only")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timing per provider and case")
    parser.add_argument("--compile-reference", action="store_true", help="add torch.compile of the reference")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    rows = []
    for case in QUICK_CASES if args.quick else CASES:
        rows += run_case(case, args.device, budget_s=args.budget, compile_reference=args.compile_reference)
    if not args.quick:
        rows += run_tracker(args.device, budget_s=args.budget)
    machine = re.sub(r"[^A-Za-z0-9]+", "_", machine_name(args.device)).strip("_")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.device}_{machine}_{time.strftime('%Y-%m-%d')}.json")
    save(rows, args.device, path)
    print(f"machine: {machine_name(args.device)}; torch {torch.__version__}; results: {path}\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
