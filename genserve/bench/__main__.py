"""`python -m genserve.bench`: the same benchmark as `genserve bench`, with the same flags.

It imports only torch, diffusers, transformers and pydantic (not the server's dependencies), so it
runs on a bare GPU machine that has those; see docs/performance.md for carrying it there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from genserve.engine.speed.optimize import parse_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genserve.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl,sd3", help="comma-separated: sd15, sdxl, sd3")
    parser.add_argument("--batch", default="1,4", help="comma-separated batch sizes (images)")
    parser.add_argument("--steps", type=int, default=None, help="steps (default: 30; 28 for sd3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path (median)")
    parser.add_argument("--tiny", action="store_true", help="tiny random-weight models (CPU smoke test)")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: each model's native)")
    parser.add_argument("--cfg-scale", type=float, default=7.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--opt", action="append", default=[], help="engine optimization KEY=VALUE (repeat)")
    parser.add_argument("--compile-cache", type=Path, default=None)
    parser.add_argument("--fresh-cache", action="store_true")
    parser.add_argument("--restart", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tag", default=None, help="results file name suffix (default: the models)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    import torch

    from genserve.bench.report import markdown, write_report
    from genserve.bench.run import BenchConfig, BenchError, run_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    options = {}
    for pair in args.opt:
        key, sep, value = pair.partition("=")
        if not sep:
            parser.error(f"--opt '{pair}' is not KEY=VALUE")
        options[key.strip()] = value.strip()
    config = BenchConfig(
        models=[m.strip() for m in args.models.split(",") if m.strip()],
        batches=[int(b) for b in args.batch.split(",") if b.strip()],
        steps=args.steps,
        repeats=args.repeats,
        tiny=args.tiny,
        cfg_scale=args.cfg_scale,
        size=parse_size(args.size) if args.size else None,
        device=args.device,
        dtype=args.dtype,
        options=options,
        compile_cache_dir=args.compile_cache,
        fresh_cache=args.fresh_cache,
        restart=args.restart,
        tag=args.tag,
    )
    try:
        report = run_bench(config, command=config.command_line(args.threads), echo=print)
    except (BenchError, ValueError) as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    print(markdown(report))
    for path in write_report(report, args.out):
        print(f"wrote {path}")
    return 1 if any(case.accuracy_passed is False for case in report.cases) else 0


if __name__ == "__main__":
    sys.exit(main())
