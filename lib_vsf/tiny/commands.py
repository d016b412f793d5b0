"""The `train-tiny` and `bench-neg` subcommands of `python -m lib_vsf` (parsers and handlers)."""
from __future__ import annotations

import sys
import time


def add_subcommands(sub) -> None:
    from . import train

    tr = sub.add_parser("train-tiny", help="train the bundled tiny model from scratch (deterministic)")
    tr.add_argument("--out", default="tiny-model", help="output pipeline directory")
    for name in ("steps", "batch", "warmup", "seed"):
        tr.add_argument(f"--{name}", type=int, default=train.DEFAULTS[name])
    tr.add_argument("--lr", type=float, default=train.DEFAULTS["lr"])
    tr.add_argument("--stop-after", type=int, default=train.DEFAULTS["stop_after"],
                    help="end after this many steps of the --steps schedule (the bundled weights: the whole 1200-step schedule)")
    tr.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")

    bn = sub.add_parser("bench-neg", help="mini NegGenBench on the tiny model: positive / negative / quality / time")
    bn.add_argument("--model", help="pipeline directory (default: the bundled tiny model)")
    bn.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 per prompt pair")
    bn.add_argument("--steps", type=int, default=8)
    bn.add_argument("--out", default="bench-neg", help="directory for bench-neg.md / .json / .png")


def run(args) -> int | None:
    """Handle a tiny-model subcommand; None when `args.command` is not one."""
    import torch

    if args.command == "train-tiny":
        from . import train

        torch.set_num_threads(args.threads)
        start = time.time()
        _, losses = train.train(steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, seed=args.seed,
                                stop_after=args.stop_after, out=args.out,
                                log=lambda s: print(s, file=sys.stderr, flush=True))
        print(f"trained {len(losses)} steps in {time.time() - start:.0f} s, final loss "
              f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", file=sys.stderr)
        print(args.out)
        return 0
    if args.command == "bench-neg":
        from . import bench
        from .model import load_pipeline

        pipe = load_pipeline(args.model)
        result = bench.run(pipe, seeds=tuple(range(args.seeds)), steps=args.steps,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
        paths = bench.write(result, args.out)
        print(bench.markdown(result))
        for path in paths.values():
            print(path)
        return 0
    return None
