"""Mixed batches: 16 concurrent requests, 8 txt2img and 8 img2img at strength 0.5, batched vs one at a time.

In the engine, in this process, on the CPU (no job store: the worker path is measured by
batching_throughput.py). Every round uses fresh pictures (jittered scenes from the toymodel's
renderer), so no VAE encoding comes from the cache. An img2img row at strength 0.5 joins the shared
loop half-way and is computed for half the steps, so the batch runs 8 rows for the first 10 steps and
16 for the last 10.

Also the batch-join overhead per row: what an img2img row costs before it joins (fitting its picture,
the VAE encode, its scheduler copy and noised latents), against a txt2img row (scheduler copy and
noise), in the same engine functions the batch runs.

    .venv/bin/python benchmarks/img2img_mixed.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from datetime import date
from pathlib import Path

import PIL.Image
import torch

from genserve.engine.conditioning.latents import EncodingCache
from genserve.engine.engine import Engine
from genserve.engine.loop.denoise import BatchItem
from genserve.engine.loop.schedule import prepare_schedulers
from genserve.engine.models.registry import ModelInfo, scan_models
from genserve.engine.models.samplers import build_scheduler
from genserve.engine.speed.optimize import device_name
from genserve.engine.stages.prepare import prepare_picture
from genserve.engine.stages.rows import build_rows
from genserve.schemas import GenerationParams
from genserve.toymodel import dataset

HASH = "sha256:" + "0" * 64  # the engine is handed the picture itself; the hash only marks img2img


def requests(info: ModelInfo, count: int, steps: int, strength: float, round_: int) -> list[BatchItem]:
    """count/2 txt2img and count/2 img2img requests, different prompts, seeds and CFG scales."""
    rng = random.Random(round_)
    triples = dataset.all_triples()
    items = []
    for i in range(count):
        scene = dataset.sample_scene(rng, triples)
        common = dict(
            prompt=dataset.canonical_caption(scene),
            model=info.name,
            seed=1000 * round_ + i,
            steps=steps,
            cfg_scale=3.0 + (i % 4),
            width=info.native_width,
            height=info.native_height,
        )
        if i % 2 == 0:
            items.append(BatchItem(GenerationParams(**common)))
        else:
            picture = dataset.draw_scene(scene, info.native_width, rng)  # jittered: a new picture
            items.append(
                BatchItem(GenerationParams(**common, init_image=HASH, strength=strength), init_image=picture)
            )
    return items


def timed(run) -> float:  # noqa: ANN001
    """CPU seconds of this process: on a CPU shared with other work, wall time measures the others too."""
    start = time.process_time()
    run()
    return time.process_time() - start


def walled(run) -> tuple[float, float]:  # noqa: ANN001
    """(wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def join_overhead(engine: Engine, info: ModelInfo, strength: float, steps: int, rows: int) -> dict:
    """CPU milliseconds per row spent before the loop: an img2img row (fit, encode, noise) vs a txt2img row."""
    pipe = engine.pipeline(info.name)
    scheduler = build_scheduler(info.family, "euler", pipe.scheduler.config)
    params = GenerationParams(prompt="x", model=info.name, seed=0, steps=steps, width=64, height=64)
    [timed_scheduler], timesteps = prepare_schedulers(pipe, info.family, scheduler, 1, params, engine.device)
    factor = pipe.vae_scale_factor
    shape = (pipe.vae.config.latent_channels, params.height // factor, params.width // factor)
    rng = random.Random(7)
    pictures = [
        dataset.draw_scene(dataset.sample_scene(rng, dataset.all_triples()), 64, rng) for _ in range(rows)
    ]

    def build(items: list[BatchItem], cache: EncodingCache) -> None:
        prepared = [prepare_picture(item.params, item.init_image, item.mask) for item in items]
        with torch.inference_mode():
            build_rows(
                info.family,
                pipe.vae.config,
                timed_scheduler,
                timesteps,
                items,
                prepared,
                lambda image: cache.encode(info.name, pipe, image, device=engine.device),
                latent_shape=shape,
                pixel_size=(params.height, params.width),
                model_channels=pipe.unet.config.in_channels,
                device=engine.device,
                dtype=engine.dtype,
            )

    text_items = [BatchItem(params.model_copy(update={"seed": i})) for i in range(rows)]
    image_items = [
        BatchItem(
            params.model_copy(update={"seed": i, "init_image": HASH, "strength": strength}), init_image=p
        )
        for i, p in enumerate(pictures)
    ]
    cache = EncodingCache(capacity=rows)
    text = statistics.median(timed(lambda: build(text_items, cache)) for _ in range(5)) / rows
    fresh = (
        statistics.median(timed(lambda: build(image_items, EncodingCache(capacity=rows))) for _ in range(5))
        / rows
    )
    build(image_items, cache)
    cached = statistics.median(timed(lambda: build(image_items, cache)) for _ in range(5)) / rows
    return {
        "txt2img_row_ms": 1000 * text,
        "img2img_row_ms": 1000 * fresh,
        "img2img_row_cached_encode_ms": 1000 * cached,
        "img2img_extra_ms_per_row": 1000 * (fresh - text),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--model", default="genserve-shapes")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    models = scan_models(args.models_dir, builtin=True)
    info = models[args.model]
    engine = Engine(models, threads=args.threads, device="cpu", dtype="float32")
    engine.warmup(args.model)
    warm = requests(info, 2, 2, args.strength, round_=99)  # first-call costs of the encode path
    engine.generate_batch(warm)

    rounds: dict[str, list[dict]] = {"one_at_a_time": [], "batched": []}
    rows_per_step: list[int] = []
    for repeat in range(args.repeats):
        items = requests(info, args.requests, args.steps, args.strength, round_=2 * repeat)
        wall, cpu = walled(lambda: [engine.generate_batch([item]) for item in items])  # noqa: B023
        rounds["one_at_a_time"].append({"wall_seconds": wall, "cpu_seconds": cpu})
        items = requests(info, args.requests, args.steps, args.strength, round_=2 * repeat + 1)
        rows_per_step.clear()
        wall, cpu = walled(
            lambda: engine.generate_batch(items, on_batch_step=lambda s, t, n: rows_per_step.append(n))  # noqa: B023
        )
        rounds["batched"].append({"wall_seconds": wall, "cpu_seconds": cpu})

    summary = {}
    for mode, results in rounds.items():
        cpu = statistics.median(r["cpu_seconds"] for r in results)
        wall = statistics.median(r["wall_seconds"] for r in results)
        summary[mode] = {
            "median_cpu_seconds": cpu,
            "images_per_cpu_second": args.requests / cpu,
            "median_wall_seconds": wall,
            "images_per_second": args.requests / wall,
        }
        print(
            f"{mode:>14}: {cpu:7.2f} CPU s ({wall:7.2f} s wall) for {args.requests} requests "
            f"= {args.requests / cpu:6.2f} images per CPU second"
        )
    speedup = summary["batched"]["images_per_cpu_second"] / summary["one_at_a_time"]["images_per_cpu_second"]
    print(
        f"batching speed-up (CPU time): {speedup:.2f}x; rows computed per step in the batch: {rows_per_step}"
    )
    overhead = join_overhead(engine, info, args.strength, args.steps, rows=8)
    print(
        "before the loop, CPU per row: txt2img {txt2img_row_ms:.2f} ms, img2img {img2img_row_ms:.2f} ms "
        "({img2img_row_cached_encode_ms:.2f} ms with the encoding cached)".format(**overhead)
    )
    result = {
        "benchmark": "img2img_mixed",
        "date": date.today().isoformat(),
        "device": "cpu",
        "cpu": device_name("cpu"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        # The CPU was shared with other processes: the 1-minute load average at the end, for reading noise.
        "load_average_1m": os.getloadavg()[0],
        "model": args.model,
        "requests": args.requests,
        "mix": f"{args.requests // 2} txt2img + {args.requests - args.requests // 2} img2img at strength {args.strength}",
        "steps": args.steps,
        "repeats": args.repeats,
        "summary": summary,
        "speedup": speedup,  # in images per CPU second of this process
        "speedup_wall": summary["batched"]["images_per_second"]
        / summary["one_at_a_time"]["images_per_second"],
        "rows_per_step_batched": rows_per_step,
        "join_overhead_per_row": overhead,
        "rounds": rounds,
        "command": f"python benchmarks/img2img_mixed.py --threads {torch.get_num_threads()}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{date.today().isoformat()}-cpu-img2img-mixed-{args.model}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    PIL.Image.init()
    main()
