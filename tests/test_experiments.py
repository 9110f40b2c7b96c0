"""A/B experiments end to end on the built-in genserve-shapes model: specs checked up front (422 naming
the field), variants × seeds rendered through the long queue as batch items, the report's grid,
metrics and tests, `genserve ab` here and against a server, the store on SQLite and PostgreSQL, and
the CLIP score with a tiny CLIP built in code."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from genserve.cli import app as cli_app
from genserve.store.db import create_db_engine
from genserve.store.experiments import ExperimentStore
from tests.helpers import LiveServer, wait_for

RED = "a red circle on a white background"
BLUE = "a blue square on a white background"
SPEC = {
    "name": "circle-vs-square",
    "base": {"prompt": RED, "size": "64x64", "steps": 4},
    "variants": [{"name": "A"}, {"name": "B", "prompt": BLUE}, {"name": "C", "cfg_scale": 7.5}],
    "seeds": [0, 1, 2],
    "target": RED,
    "gpu_price_per_hour": 2.5,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("experiments")
    (root / "models").mkdir()
    env = {
        "GENSERVE_BUILTIN_MODELS": "true",
        "GENSERVE_DEFAULT_MODEL": "genserve-shapes",
        "GENSERVE_WARMUP": "false",
    }
    # Not waiting for the worker to warm up: the checks of bad specs need none, the experiment waits.
    live = LiveServer(root / "models", root / "data", env=env).start(wait_ready=False)
    yield live
    live.kill_all()  # nothing to keep: a graceful stop would only cost seconds


@pytest.fixture(scope="module")
def finished(server: LiveServer) -> dict:
    """The spec's experiment, run to the end once for the tests that read it."""
    with server.client() as client:
        created = client.post("/v1/experiments", json=SPEC)
        assert created.status_code == 202, created.text
        experiment = created.json()
        assert experiment["counts"]["total"] == 9 and experiment["variants"] == ["A", "B", "C"]
        done = wait_for(
            lambda: (e := client.get(f"/v1/experiments/{experiment['id']}").json())["done"] and e,
            timeout=120,
            interval=0.2,
            message="the experiment to finish",
        )
    return done


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (
            {"variants": [{"name": "A"}, {"name": "B", "model": "no-such-model"}]},
            "variants[1].model",
            "not registered",
        ),
        ({"seeds": 200}, "seeds", "the limit is 400"),
        ({"base": {"size": "64x64"}}, "variants[0].prompt", "no prompt"),
        ({"variants": [{"name": "A"}, {"name": "B", "steps": 500}]}, "variants[1].steps", "max_steps"),
        ({"variants": [{"name": "A"}, {"name": "A"}]}, "variants[1].name", "used twice"),
        ({"metrics": ["psnr"]}, "body.metrics.0", "'mse'"),
        ({"reference_image": "not a picture"}, "reference_image", "base64"),
    ],
)
def test_bad_specs_are_refused_before_anything_runs(server, change, field, words):
    with server.client() as client:
        jobs_before = client.get("/v1/jobs", params={"limit": 100}).json()["items"]
        response = client.post("/v1/experiments", json={**SPEC, **change})
        assert response.status_code == 422, response.text
        messages = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in response.json()["detail"]]
        assert any(field in message and words in message for message in messages), messages
        assert client.get("/v1/jobs", params={"limit": 100}).json()["items"] == jobs_before


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "expected a mapping"),
        ("/etc/passwd", "expected a mapping"),  # a string is never read as a path on the server
        ("a: &x [1]\nb: *x", "aliases"),
        ("seeds: .nan", "NaN"),
        ("variants: [", "not valid YAML"),
        ("variants: [{name: A, prompt: x}]", "at least 2"),
    ],
)
def test_bad_spec_texts_are_refused(server, text, words):
    with server.client() as client:
        response = client.post("/v1/experiments/text", json={"spec": text})
    assert response.status_code == 422, response.text
    assert any(words in entry["msg"] for entry in response.json()["detail"]), response.text


def test_shape_and_colour_scores_separate_the_circle_from_the_square(server, finished):
    assert finished["counts"]["succeeded"] == 9
    with server.client() as client:
        results = client.get(finished["results_url"]).json()
    a, b, c = results["variants"]
    # Scored against the target (A's prompt): A and C draw it; B draws a blue square.
    assert a["means"]["shape"] > 0.9 and c["means"]["shape"] > 0.9 and b["means"]["shape"] < 0.1
    assert a["means"]["colour"] > 0.8 and b["means"]["colour"] < 0.6
    for row in results["cells"]:
        assert [cell["detected"] for cell in row] == [
            "red circle on white",
            "blue square on white",
            "red circle on white",
        ]
    # No reference: MSE/SSIM against A's image of the same seed; a cfg change moves it less than a new prompt.
    assert (
        b["means"]["mse_vs_a"] > 10 * c["means"]["mse_vs_a"]
        and b["means"]["ssim_vs_a"] < c["means"]["ssim_vs_a"] < 1
    )
    tests = {(t["metric"], t["variant"]): t["test"] for t in results["comparisons"]}
    shape_b = tests[("shape", "B")]
    assert shape_b["n"] == 3 and shape_b["w_plus"] == 0 and shape_b["p_value"] == 0.25 and shape_b["exact"]
    assert shape_b["seeds_needed"] == 6  # an effect this large needs only the test's minimum
    # Time from the jobs' timings, cost from the cost model's GPU-seconds at the spec's price.
    assert a["mean_seconds"] > 0 and a["cost_per_image"] == pytest.approx(
        a["gpu_seconds_per_image"] * 2.5 / 3600
    )


def test_report_is_one_self_contained_page_with_a_grid_per_seed(server, finished):
    with server.client() as client:
        response = client.get(finished["report_url"])
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    images = re.findall(r'<img alt="seed (\d+)" class="px" src="data:image/png;base64,([^"]+)"', html)
    assert [int(seed) for seed, _ in images] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert Image.open(io.BytesIO(base64.b64decode(images[0][1]))).size == (64, 64)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html) and "<script" not in html
    assert "<table class='grid'>" in html and "p (Wilcoxon, paired by seed)" in html
    assert "CLIP score skipped: no CLIP model in" in html


def test_cli_against_the_server_reuses_the_rendered_images(server, finished, tmp_path):
    (tmp_path / "ab.yaml").write_text(yaml.safe_dump(SPEC))
    report = tmp_path / "report.html"
    result = CliRunner().invoke(
        cli_app, ["ab", str(tmp_path / "ab.yaml"), "--server", server.url, "-o", str(report)]
    )
    assert result.exit_code == 0, result.output
    assert report.read_text().count("data:image/png;base64,") == 9
    # A second experiment with the same items: the same jobs (batch items de-duplicate by key), and
    # both experiments are in the store for any process that opens it (a restart loses nothing).
    store = ExperimentStore(create_db_engine(f"sqlite:///{server.data_dir / 'genserve.db'}"))
    first, second = sorted(store.list(), key=lambda record: record.created_at)[-2:]
    assert first.id == finished["id"] and store.cells(first.id) == store.cells(second.id)
    assert len(set(store.cells(first.id).values())) == 9


def test_genserve_ab_runs_here_and_writes_the_report(tmp_path):
    Image.new("RGB", (64, 64), (255, 255, 255)).save(tmp_path / "white.png")
    spec = {
        "base": {"prompt": "a green star on a black background", "size": "64x64", "steps": 2},
        "variants": [{"name": "plain"}, {"name": "short", "prompt": "a green star"}],
        "seeds": 2,
        "metrics": ["mse", "colour"],
        "reference_image": "white.png",
    }
    (tmp_path / "ab.yaml").write_text(yaml.safe_dump(spec))
    env = {"GENSERVE_DATA_DIR": str(tmp_path / "data"), "GENSERVE_MODELS_DIR": str(tmp_path / "models"),
           "GENSERVE_TORCH_THREADS": "1", "GENSERVE_DEFAULT_MODEL": "genserve-shapes"}  # fmt: skip
    result = CliRunner().invoke(cli_app, ["ab", str(tmp_path / "ab.yaml")], env=env)
    assert result.exit_code == 0, result.output
    assert "MSE vs reference" in result.output and "colour score" in result.output  # the summary table
    html = (tmp_path / "experiment-output" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "MSE vs reference" in html
    rows = [
        json.loads(line)
        for line in (tmp_path / "experiment-output" / "manifest.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 4 and all(row["state"] == "succeeded" for row in rows)


def test_genserve_ab_validate_and_estimate_render_nothing(tmp_path):
    (tmp_path / "ab.yaml").write_text(yaml.safe_dump(SPEC))
    env = {"GENSERVE_DATA_DIR": str(tmp_path / "data"), "GENSERVE_MODELS_DIR": str(tmp_path / "models")}
    checked = CliRunner().invoke(cli_app, ["ab", str(tmp_path / "ab.yaml"), "--validate"], env=env)
    assert checked.exit_code == 0 and "3 variants × 3 seeds: 9 images, 9 unique" in checked.output
    estimated = CliRunner().invoke(cli_app, ["ab", str(tmp_path / "ab.yaml"), "--estimate"], env=env)
    assert estimated.exit_code == 0 and "total: 9 images" in estimated.output, estimated.output
    assert not (tmp_path / "data" / "images").exists()


def test_experiment_store_on_both_backends(store_url):
    store = ExperimentStore(create_db_engine(store_url))
    cells = {(0, 0): ("k0", "j0"), (1, 0): ("k1", "j1"), (1, 1): ("k0", "j0")}
    experiment_id = store.create("e", {"name": "e"}, cells, client_id="c1")
    record = store.get(experiment_id)
    assert record is not None and record.spec == {"name": "e"} and record.created_at.tzinfo is not None
    assert store.cells(experiment_id) == {(0, 0): "j0", (1, 0): "j1", (1, 1): "j0"}
    assert [r.id for r in store.list("c1")] == [experiment_id] and store.list("c2") == []
    assert store.get("missing") is None


def write_tiny_clip(folder: Path) -> Path:
    """A random-weight CLIP with its processor, saved as an operator would install one."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from genserve.engine.models.fixtures import _tiny_tokenizer

    tokenizer = _tiny_tokenizer()
    small = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={**small, "vocab_size": len(tokenizer), "max_position_embeddings": 77,
                     "eos_token_id": tokenizer.eos_token_id},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score_with_a_clip_model_in_the_models_folder(tmp_path):
    from genserve.engine.models.registry import scan_models
    from genserve.experiments import scorers

    assert scorers.clip_folder(tmp_path) is None
    write_tiny_clip(tmp_path / "clip")
    folder = scorers.clip_folder(tmp_path)
    assert folder == tmp_path / "clip"
    assert scan_models(tmp_path) == {}  # the CLIP folder is not an image model
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3)).astype(np.uint8) for _ in range(3)]
    prompts = [RED, BLUE, "a green star"]
    scores = scorers.clip_scores(folder, images, prompts)
    # The same cosines by another route: the model's logits_per_image are logit_scale.exp() × cosine.
    import torch
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    inputs = processor(
        text=prompts, images=[Image.fromarray(i) for i in images], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        output = model(**inputs)
    cosines = (output.logits_per_image.diagonal() / model.logit_scale.exp()).tolist()
    assert scores == pytest.approx([100 * max(c, 0.0) for c in cosines], abs=1e-3)
    assert any(score > 0 for score in scores)  # not every pair clamped at 0 (seeded weights)


def test_experiments_tab_runs_a_spec_and_shows_its_report(server, finished):
    from tests.test_web_ui import CHROMIUM, SHOTS, require_playwright

    sync_api = require_playwright()
    expect, sync_playwright = sync_api.expect, sync_api.sync_playwright
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{server.url}/#experiments")
        expect(page.locator("#experiments-page")).to_be_visible()
        # A refused spec shows the server's message, naming the field.
        page.fill("#experiment-spec", "variants: [{name: A, prompt: x}, {name: B, prompt: y}]\nseeds: 0\n")
        page.click("#experiment-form button[type=submit]")
        expect(page.locator("#experiment-error")).to_contain_text("eeds: a seed count must be in 1..400")
        # Two prompts × 2 seeds from the fields: progress, then the report in the frame.
        page.fill("#experiment-prompts", "a green star on a black background\na green star")
        page.fill("#experiment-seeds", "2")
        page.fill("#experiment-steps", "2")
        page.fill("#experiment-size", "64x64")
        page.click("#experiment-form [data-action=write]")
        assert '- {name: B, prompt: "a green star"}' in page.input_value("#experiment-spec")
        page.click("#experiment-form button[type=submit]")
        expect(page.locator("#experiment-status")).to_contain_text("4 / 4 images · done", timeout=60_000)
        report = page.frame_locator("#experiment-report")
        expect(report.locator("img")).to_have_count(4)
        # The experiment run before is in the list; choosing it shows its report.
        page.get_by_role("button", name=SPEC["name"]).first.click()  # the CLI test ran it again
        expect(report.locator("img")).to_have_count(9)
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "experiments.png"))
        browser.close()
    assert errors == []


def test_analysis_with_a_reference_clip_and_a_failed_image(tmp_path):
    """The report's numbers from drawn pictures standing in for jobs: MSE/SSIM against a reference
    (paired tests), CLIP when a model is installed, a failed image left out and said so, the cost."""
    import random
    from datetime import UTC, datetime, timedelta

    from genserve.experiments.analysis import analyse
    from genserve.experiments.report import render_html
    from genserve.experiments.spec import ExperimentSpec
    from genserve.schemas import JobState
    from genserve.store.jobs import JobRecord
    from genserve.toymodel.dataset import Scene, draw_scene

    write_tiny_clip(tmp_path / "clip")
    spec = ExperimentSpec.model_validate(
        {
            **SPEC,
            "reference_image": "sha256:" + "0" * 64,
            "variants": SPEC["variants"][:2],
            "seeds": [0, 1, 2],
        }
    )
    pngs: dict[str, bytes] = {}

    def picture(scene: Scene, seed: int) -> str:
        buffer = io.BytesIO()
        draw_scene(scene, 64, random.Random(seed)).save(buffer, format="PNG")
        pngs[f"img{len(pngs)}"] = buffer.getvalue()
        return f"img{len(pngs) - 1}"

    start = datetime(2026, 1, 1, tzinfo=UTC)

    def job(state: JobState, images: list[str]) -> JobRecord:
        return JobRecord(
            id=f"job{len(pngs)}", request_id=None, request_hash=None, params={}, state=state, priority=0,
            client_id=None, created_at=start, started_at=start, finished_at=start + timedelta(seconds=2),
            updated_at=start, attempt=1, max_attempts=3, lease_owner=None, lease_until=None,
            cancel_requested=False, error="out of memory" if state == JobState.failed else None,
            image_ids=images, estimated_seconds=0.36,
        )  # fmt: skip

    circle, square = (
        Scene("circle", "red", "white", "center", "large"),
        Scene("square", "blue", "white", "center", "large"),
    )
    jobs = {(0, s): job(JobState.succeeded, [picture(circle, s)]) for s in range(3)}
    jobs |= {(1, s): job(JobState.succeeded, [picture(square, s)]) for s in range(2)}
    jobs[(1, 2)] = job(JobState.failed, [])
    reference = io.BytesIO()
    draw_scene(circle, 128).save(reference, format="PNG")  # twice the size: resized for MSE/SSIM

    results = analyse(spec, jobs, pngs.get, reference.getvalue(), tmp_path)
    a, b = results.variants
    assert (a.done, b.done, b.failed) == (3, 2, 1)
    assert a.means["mse_ref"] < b.means["mse_ref"] and a.means["ssim_ref"] > b.means["ssim_ref"]
    assert 0 <= a.means["clip"] <= 100 and "clip" in results.metrics
    assert a.cost_per_image == pytest.approx(0.36 * 2.5 / 3600) and a.mean_seconds == 2.0
    tests = {(c.metric, c.variant): c.test for c in results.comparisons}
    assert tests[("mse_ref", "B")].n == 2 and tests[("mse_ref", "B")].w_plus == 3  # both seeds worse
    assert any("1 image(s) failed" in note for note in results.notes)
    assert any("resized" in note for note in results.notes)
    html = render_html(results)
    assert html.count("data:image/png;base64,") == 5 and "out of memory" in html and "CLIP score" in html


def test_cancel_an_experiment(server, finished):
    spec = {**SPEC, "name": "to-cancel", "base": {**SPEC["base"], "steps": 60}, "seeds": 10}
    with server.client() as client:
        experiment = client.post("/v1/experiments", json=spec).json()
        canceled = client.delete(f"/v1/experiments/{experiment['id']}")
        assert canceled.status_code == 200
        counts = wait_for(
            lambda: (
                (c := client.get(f"/v1/experiments/{experiment['id']}").json()["counts"])["queued"] == 0
                and c["running"] == 0
                and c
            ),
            message="the experiment's images to stop",
        )
        assert counts["canceled"] > 20 and counts["total"] == 30
        assert client.delete("/v1/experiments/no-such-id").status_code == 404
