"""An experiment's report: one self-contained HTML file (pictures as data URLs, inline CSS, no script,
nothing fetched), readable offline and attachable to a ticket."""

from __future__ import annotations

import base64
import io
import math
from datetime import UTC, datetime
from html import escape

from PIL import Image

from genserve.experiments.analysis import METRICS, UNPAIRED, Cell, ExperimentResults

EMBED_SIDE = 384  # the longest side of an embedded picture
SHOWN_SIDE = 160  # the grid's picture width

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.meta{color:#5a6272;margin:0 0 16px}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #d5d9e0;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f1f3f6;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid td{text-align:center}.grid img{width:160px;height:auto;display:block;margin:0 auto 4px}.grid img.px{image-rendering:pixelated}
.cap{font-size:12px;color:#5a6272}.fail{color:#b3261e}.sig{font-weight:700}
.notes li{margin:4px 0}code{background:#f1f3f6;padding:0 3px;border-radius:3px}
"""


def _number(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{digits}g}"


def _money(value: float | None) -> str:
    return "–" if value is None else f"{value:.6f}"


def _image(cell: Cell) -> str:
    if cell.png is None:
        reason = cell.error or cell.state
        return f'<span class="{"fail" if cell.state in ("failed", "canceled") else "cap"}">{escape(reason)}</span>'
    mime, data, side = _embedded(cell.png)
    crisp = ' class="px"' if side < SHOWN_SIDE else ""  # small pictures enlarged: pixels, not blur
    scores = " · ".join(
        f"{METRICS[key][0].split(' ')[0]} {_number(value, 3)}" for key, value in cell.metrics.items()
    )
    seen = f"<br>sees: {escape(cell.detected)}" if cell.detected else ""
    return f'<img alt="seed {cell.seed}"{crisp} src="data:{mime};base64,{data}"><div class="cap">{escape(scores)}{seen}</div>'


def _embedded(png: bytes) -> tuple[str, str, int]:
    """The picture as the report embeds it: as generated when small, else a JPEG of at most
    EMBED_SIDE pixels a side, so that hundreds of large images still make a file a browser opens.
    (The metrics are computed on the full images.) Returns the type, base64 and longest side."""
    image = Image.open(io.BytesIO(png))
    if max(image.size) <= EMBED_SIDE:
        return "image/png", base64.b64encode(png).decode("ascii"), max(image.size)
    image = image.convert("RGB")
    image.thumbnail((EMBED_SIDE, EMBED_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "image/jpeg", base64.b64encode(buffer.getvalue()).decode("ascii"), max(image.size)


def render_html(results: ExperimentResults, created_at: datetime | None = None) -> str:
    """The whole report as one HTML document."""
    names = [variant.name for variant in results.variants]
    when = (created_at or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    state = "complete" if results.done else "in progress (reload for more)"
    counts = ", ".join(f"{n} {state_}" for state_, n in results.counts.items() if n and state_ != "total")
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{escape(results.name)}: experiment report</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(results.name)}</h1>",
        f"<p class='meta'>{len(names)} variants × {len(results.seeds)} seeds · {state} · {escape(counts)} · {when}</p>",
        _variants_table(results),
        _metrics_table(results),
        "<h2>Images, one row per seed</h2>",
        _grid(results, names),
        _notes(results),
        "</body></html>",
    ]
    return "\n".join(parts)


def _variants_table(results: ExperimentResults) -> str:
    rows = []
    for v in results.variants:
        p = v.params
        settings = ", ".join(
            f"{k} {escape(str(p[k]))}" for k in ("model", "size", "steps", "cfg_scale", "sampler") if k in p
        )
        negative = (
            f"<br><span class='cap'>negative: {escape(p['negative_prompt'])}</span>"
            if p.get("negative_prompt")
            else ""
        )
        rows.append(
            f"<tr><th>{escape(v.name)}</th><td>{escape(p.get('prompt', ''))}{negative}</td><td>{settings or 'base'}</td>"
            f"<td class='num'>{v.done}{f' <span class=fail>({v.failed} failed)</span>' if v.failed else ''}</td>"
            f"<td class='num'>{_number(v.mean_seconds, 3)}</td><td class='num'>{_number(v.gpu_seconds_per_image, 3)}</td>"
            f"<td class='num'>{_money(v.cost_per_image)}</td></tr>"
        )
    return (
        "<h2>Variants</h2><table><tr><th>variant</th><th>prompt</th><th>parameters</th><th>images</th>"
        "<th>mean time (s)</th><th>GPU-s / image (estimate)</th><th>cost / image</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _metrics_table(results: ExperimentResults) -> str:
    if not results.metrics:
        return "<h2>Metrics</h2><p>No metric could be computed yet.</p>"
    tests = {(c.metric, c.variant): c for c in results.comparisons}
    rows = []
    for key in results.metrics:
        label, higher = METRICS[key]
        for v in results.variants:
            if key in UNPAIRED and v is results.variants[0]:
                continue  # A against itself
            mean, sd = v.means.get(key), v.sds.get(key)
            test = tests.get((key, v.name))
            if test is None:
                tail = (
                    "<td colspan='5' class='cap'>baseline</td>"
                    if v is results.variants[0]
                    else "<td colspan='5'></td>"
                )
                if key in UNPAIRED:
                    tail = "<td colspan='5' class='cap'>no test (A is the comparison)</td>"
            else:
                t = test.test
                significant = " class='num sig'" if t.p_value < 0.05 else " class='num'"
                tail = (
                    f"<td class='num'>{_number(test.variant_mean - test.baseline_mean, 3)}</td>"
                    f"<td{significant}>{_number(t.p_value, 3)}{'' if t.exact else ' (normal approx.)'}</td>"
                    f"<td class='num'>{_number(t.effect_dz, 3)}</td><td class='num'>{_number(t.rank_biserial, 3)}</td>"
                    f"<td class='num'>{t.seeds_needed if t.seeds_needed is not None else 'no effect seen'}</td>"
                )
            spread = f" ± {_number(sd, 3)}" if sd is not None else ""
            rows.append(
                f"<tr><th>{escape(label)} {'↑' if higher else '↓'}</th><td>{escape(v.name)}</td>"
                f"<td class='num'>{_number(mean, 4)}{spread}</td>{tail}</tr>"
            )
    return (
        "<h2>Metrics and significance against A</h2><table><tr><th>metric</th><th>variant</th><th>mean ± sd</th>"
        "<th>Δ vs A</th><th>p (Wilcoxon, paired by seed)</th><th>effect d<sub>z</sub></th><th>rank-biserial r</th>"
        "<th>seeds needed (80% power, α 0.05)</th></tr>" + "".join(rows) + "</table>"
    )


def _grid(results: ExperimentResults, names: list[str]) -> str:
    head = "<tr><th>seed</th>" + "".join(f"<th>{escape(name)}</th>" for name in names) + "</tr>"
    rows = [
        f"<tr><th>{seed}</th>" + "".join(f"<td>{_image(cell)}</td>" for cell in row) + "</tr>"
        for seed, row in zip(results.seeds, results.cells, strict=True)
    ]
    return f"<table class='grid'>{head}{''.join(rows)}</table>"


def _notes(results: ExperimentResults) -> str:
    fixed = [
        "Each variant is compared with A seed by seed (same seed, same starting noise) with Wilcoxon's "
        "signed-rank test, exact for up to 60 pairs. d<sub>z</sub> = mean(difference) / sd(difference). "
        "Seeds needed: ⌈(((1.960 + 0.842) / d<sub>z</sub>)² + 1.960²/2) / (3/π)⌉, at least 6.",
        "Time is each image's job from start to finish (images batched together share it); GPU-seconds "
        "are the cost model's estimate for the image alone; cost is GPU-seconds × the spec's "
        "gpu_price_per_hour.",
    ]
    items = "".join(f"<li>{escape(note)}</li>" for note in results.notes) + "".join(
        f"<li>{note}</li>" for note in fixed
    )
    return f"<h2>Notes</h2><ul class='notes'>{items}</ul>"
