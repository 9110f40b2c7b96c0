"""The results of `genserve bench` as a table: Markdown and JSON files, rows for the terminal."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from genserve.bench.paths import ACCURACY_LIMIT
from genserve.bench.run import BenchReport, CaseResult, ModelResult, PathResult


def table_rows(report: BenchReport) -> list[list[str]]:
    """The results table, header first: one row per path and case."""
    rows = [
        [
            "model",
            "resolution",
            "batch",
            "steps",
            "path",
            "s/image",
            "images/hour",
            "TFLOP/s",
            "% of matmul peak",
            "speed-up",
            "peak memory (GiB)",
            "compile + warm-up (s)",
            "accuracy (rel. L2 of final latents)",
        ]
    ]
    for case in report.cases:
        for result in (case.diffusers, case.genserve):
            if result.path == "diffusers":
                accuracy = f"baseline; genserve eager vs diffusers {case.rel_l2_eager_vs_diffusers:.1e}"
            elif case.accuracy_passed is None:
                accuracy = f"{case.rel_l2_vs_eager:.1e} vs eager (lossy opt-in: reported, not gated)"
            else:
                mark = "pass" if case.accuracy_passed else "FAIL"
                accuracy = f"{case.rel_l2_vs_eager:.1e} vs eager, limit {ACCURACY_LIMIT:g}: {mark}"
            rows.append(
                [
                    case.model,
                    case.resolution,
                    str(case.batch),
                    str(case.steps),
                    result.path,
                    f"{result.seconds_per_image:.4f}",
                    f"{result.images_per_hour:,.0f}",
                    _tflops(result.tflops),
                    f"{result.percent_of_peak:.1f}",
                    f"{result.speedup:.2f}x",
                    f"{result.peak_memory_gib:.2f}",
                    f"{result.first_call_s:.1f}",
                    accuracy,
                ]
            )
    return rows


def _tflops(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.4f}"


def markdown(report: BenchReport) -> str:
    rows = table_rows(report)
    peaks = ", ".join(f"{dtype} {value:.3g} TFLOP/s" for dtype, value in report.matmul_peak_tflops.items())
    memory_note = (
        "this pipeline's weights plus the activation peak of its run"
        if report.device_type == "cuda"
        else "the process's max RSS (both paths share one process, so the figure is the same for both)"
    )
    lines = [
        f"# genserve bench: {report.device}, {report.date}",
        "",
        f"torch {report.torch}, diffusers {report.diffusers}, Python {report.python}, "
        f"{report.threads} torch thread(s). Matmul peak measured in this run "
        f"({report.matmul_n}³): {peaks}.",
        "",
        f"Command: `{report.command}`" if report.command else "",
        "",
        *(
            ["**Interrupted:** the run was stopped early; the table holds the cases it finished.", ""]
            if report.interrupted
            else []
        ),
        "| " + " | ".join(rows[0]) + " |",
        "|" + "|".join("---" for _ in rows[0]) + "|",
        *("| " + " | ".join(row) + " |" for row in rows[1:]),
        "",
        *(
            [
                "**A CPU smoke test, not a performance result:** tiny models on a shared CPU check that both "
                "paths run, agree and are measured; their timings say nothing about GPU speed.",
                "",
            ]
            if report.device_type != "cuda"
            else []
        ),
        "- s/image and images/hour: the median of the timed runs of each path, which alternate.",
        "- TFLOP/s: FLOPs counted with FlopCounterMode (text encoders, steps × one denoiser call with CFG, "
        "one VAE decode) divided by the median time; % of the matmul peak measured above.",
        f"- Peak memory: {memory_note}.",
        "- Compile + warm-up: the first call of this shape (genserve: compilation included; "
        f"compile cache {'warm' if report.compile_cache_was_warm else 'cold'} at start, "
        f"`{report.compile_cache}`).",
        "- Accuracy: relative L2 between genserve's final latents and the eager path's (the same loop "
        "without optimizations) on the same prompt, seeds, initial noise and scheduler.",
        "",
        "| model | dtype | denoiser parameters | levers applied | apply (s) | restart: ready (s) |",
        "|---|---|---|---|---|---|",
    ]
    for m in report.models:
        levers = ", ".join(_lever(k, v) for k, v in m.applied.items() if _shown(k, v))
        restart = (
            "not measured"
            if m.restart_ready_s is None
            else f"{m.restart_ready_s:.1f} ({m.restart_shapes} warm-up runs)"
        )
        lines.append(
            f"| {m.model} ({m.note}) | {m.dtype} | {m.denoiser_params / 1e6:.1f}M | {levers} | "
            f"{m.apply_s:.2f} | {restart} |"
        )
    return "\n".join(lines) + "\n"


_LEVERS = (
    "channels_last",
    "fuse_qkv",
    "sdpa_backend",
    "compile",
    "compile_vae",
    "vae_decode",
    "deepcache",
    "fp8",
)


def _shown(key: str, value: Any) -> bool:
    return key in _LEVERS or (key == "notes" and bool(value))


def _lever(key: str, value: Any) -> str:
    if key == "notes":
        return "notes: " + "; ".join(value)
    return f"{key}={value}"


def read_report(path: Path) -> BenchReport:
    """A report from its JSON file (to regenerate the Markdown, or compare runs)."""
    data = json.loads(Path(path).read_text())
    data["models"] = [ModelResult(**m) for m in data["models"]]
    data["cases"] = [
        CaseResult(
            **{**c, "diffusers": PathResult(**c["diffusers"]), "genserve": PathResult(**c["genserve"])}
        )
        for c in data["cases"]
    ]
    return BenchReport(**data)


def write_report(report: BenchReport, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{report.date}-{slug(report.device)}-bench-{slug(report.tag)}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
