"""Command line: `python -m bandadv demo | bench`."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bandadv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a realistic batch through group_advantages")
    demo.add_argument("--prompts", type=int, default=64)
    demo.add_argument("--group-size", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)
    bench = commands.add_parser("bench", help="time bandadv against trainers' advantage code on this machine")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        demo_main(args.prompts, args.group_size, args.seed)
    elif args.command == "bench":
        from .bench import headline

        headline(args.device)


if __name__ == "__main__":
    main()
