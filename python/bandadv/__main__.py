"""Command line: `python -m bandadv demo | simulate [--testbed tokens] [--compare] | bench`."""

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
    bench.add_argument("--tracker", action="store_true", help="also time PromptTracker (all models, 2**20 prompts)")
    sim = commands.add_parser("simulate", help="train a small policy on group_advantages (the learning testbed)")
    sim.add_argument("--compare", action="store_true", help="every method over several seeds at equal budgets")
    sim.add_argument("--seeds", type=int, default=3)
    sim.add_argument("--steps", type=int, default=None)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument(
        "--png",
        default=None,
        help="where to write the plot ('' for none; default simulate.png, simulate_tokens.png for --testbed tokens)",
    )
    sim.add_argument(
        "--testbed",
        choices=["small", "tokens"],
        default="small",
        help="small: 13-parameter policy; tokens: a small transformer on token traces",
    )
    sim.add_argument("--reward", choices=["outcome", "process"], default="outcome", help="tokens testbed, single run")
    sim.add_argument("--jobs", type=int, default=2, help="tokens testbed --compare: runs at a time, 1 thread each")
    sim.add_argument("--out", default=None, help="tokens testbed --compare: also write the table to this file")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        demo_main(args.prompts, args.group_size, args.seed)
    elif args.command == "simulate" and args.testbed == "tokens":
        from dataclasses import replace

        from . import tokens

        cfg = tokens.TokenConfig(seed=args.seed)
        if args.steps is not None:
            cfg = replace(cfg, steps=args.steps)
        if args.compare:
            tokens.compare(cfg, seeds=args.seeds, jobs=args.jobs, out=args.out, png=args.png or None)
        else:
            png = "simulate_tokens.png" if args.png is None else args.png
            tokens.main(cfg, reward=args.reward, png=png or None)
    elif args.command == "simulate":
        from dataclasses import replace

        from .simulate import SimConfig, compare
        from .simulate import main as simulate_main

        cfg = SimConfig(seed=args.seed)
        if args.steps is not None:
            cfg = replace(cfg, steps=args.steps)
        if args.compare:
            compare(cfg, seeds=args.seeds)
        else:
            png = "simulate.png" if args.png is None else args.png
            simulate_main(cfg, png=png or None)
    elif args.command == "bench":
        from .bench import headline

        headline(args.device, tracker=args.tracker)


if __name__ == "__main__":
    main()
