"""LoRA hot-swap under the real compiler: inductor on this CPU, the sequence of tests/test_lora_hotswap.py.

The test runs dynamo with the eager backend (the same tracing and guards, without inductor's code
generation, which takes minutes here). This runs it with inductor once: an engine with
`lora_hotswap_rank=8, compile=default` generates with LoRA A (rank 4; the compile), then B (rank 2,
another alpha: a swap), A at weight 0.5 and no LoRA. It records the seconds, dynamo's graph count
before and after the swaps, and each image's largest difference from an engine that loads the LoRA
the ordinary way (no compile).

    .venv/bin/python benchmarks/lora_hotswap.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genserve.engine.models.fixtures import write_tiny_pipeline  # noqa: E402
from genserve.engine.speed.optimize import device_name  # noqa: E402
from tests.test_lora import write_diffusers_lora  # noqa: E402
from tests.test_lora_hotswap import engine, image  # noqa: E402


def main() -> None:
    from torch._dynamo.utils import counters

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp())
    base = write_tiny_pipeline("sd15", root / "tiny-sd15")
    write_diffusers_lora(base, root / "lora" / "style-a.safetensors", seed=1)
    write_diffusers_lora(base, root / "lora" / "style-b.safetensors", seed=2, rank=2, alpha=6)
    reference = engine(root)
    hot = engine(root, lora_hotswap_rank=8, compile="default", compile_backend="inductor", compile_vae=False)
    start = time.perf_counter()
    first = image(hot, "style-a")
    compile_seconds = time.perf_counter() - start
    graphs_after_compile = counters["stats"]["unique_graphs"]
    requests = [("style-b", 0.6), ("style-a", 0.5), (None, 1.0)]
    start = time.perf_counter()
    outputs = [image(hot, lora, weight) for lora, weight in requests]
    swap_seconds = time.perf_counter() - start
    graphs_after_swaps = counters["stats"]["unique_graphs"]
    diffs = {
        f"{lora}@{weight}": int(np.abs(out - image(reference, lora, weight)).max())
        for (lora, weight), out in zip([("style-a", 1.0), *requests], [first, *outputs], strict=True)
    }
    report = {
        "benchmark": "lora_hotswap",
        "date": date.today().isoformat(),
        "device": "cpu",
        "cpu": device_name("cpu"),
        "torch": torch.__version__,
        "threads": 1,
        "load_average_1m": os.getloadavg()[0],
        "model": "tiny-sd15 (genserve/engine/models/fixtures.py), 64x64, 2 steps, CFG",
        "compile": "inductor, mode default, UNet only",
        "first_lora_batch_seconds_with_compile": compile_seconds,
        "swap_reweight_and_no_lora_batches_seconds": swap_seconds,
        "unique_graphs_after_compile": graphs_after_compile,
        "unique_graphs_after_swaps": graphs_after_swaps,
        "max_pixel_diff_vs_fresh_load": diffs,
    }
    print(json.dumps(report, indent=2))
    out = Path("benchmarks/results") / f"{date.today().isoformat()}-cpu-lora-hotswap-inductor-tiny-sd15.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
