"""The image form's LoRA, ControlNet and IP-Adapter panels and the "Upscale ×2" button, end to end:
headless Chromium (through Playwright) against a live server with the built-in models only
(genserve-shapes, its LoRA shapes-white-frame, its ControlNet genserve-shapes-canny and the upscaler
genserve-shapes-2x). Skips like tests/test_web_ui.py without a browser.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tests.helpers import LiveServer
from tests.test_web_ui import CHROMIUM, _is_http_error, _unavailable


@pytest.fixture(scope="module")
def playwright_api():
    try:
        from playwright import sync_api
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    if not Path(CHROMIUM).is_file():
        _unavailable(f"chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    return sync_api


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    live = LiveServer(
        models_dir=tmp_path_factory.mktemp("web-control-models"),
        data_dir=tmp_path_factory.mktemp("web-control-data"),
        env={
            "GENSERVE_BUILTIN_MODELS": "true",
            "GENSERVE_DEFAULT_MODEL": "genserve-shapes",
            "GENSERVE_WORKERS": "1",
        },
    ).start()
    yield live
    live.stop()


def _square_png() -> bytes:
    """A white square on black: canny finds its four edges."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(picture).rectangle((16, 16, 47, 47), fill="white")
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def _natural_size(locator) -> list[int]:
    return locator.evaluate("img => [img.naturalWidth, img.naturalHeight]")


def test_lora_controlnet_preview_generate_then_upscale(playwright_api, server):
    expect = playwright_api.expect
    errors: list[str] = []
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on(
            "console", lambda m: m.type == "error" and not _is_http_error(m.text) and errors.append(m.text)
        )
        page.goto(server.url)
        expect(page.locator("body[data-ready]")).to_have_count(1)
        expect(page.locator("#model")).to_have_value("genserve-shapes")

        # The panels start collapsed; LoRAs of the model's family only.
        for panel in ("#loras-details", "#controlnets-details"):
            expect(page.locator(panel)).to_be_visible()
            assert page.locator(panel).evaluate("d => d.open") is False
        page.click("#loras-details summary")
        options = page.locator("#lora-choice option").evaluate_all("os => os.map(o => o.value)")
        assert "shapes-white-frame" in options
        page.select_option("#lora-choice", "shapes-white-frame")
        page.click("#lora-add")
        slider = page.locator(".lora-item[data-lora='shapes-white-frame'] input[type=range]")
        expect(slider).to_have_value("1")
        assert slider.get_attribute("min") == "-2" and slider.get_attribute("max") == "2"
        slider.fill("0.8")

        # A ControlNet unit: the canny model, an uploaded picture, its map previewed.
        page.click("#controlnets-details summary")
        page.click("#controlnet-add")
        unit = page.locator(".control-unit").first
        expect(unit.locator("select").first).to_have_value("genserve-shapes-canny")
        with page.expect_response(lambda r: r.url.endswith("/v1/uploads")) as uploaded:
            unit.locator("input[type=file]").set_input_files(
                files=[{"name": "square.png", "mimeType": "image/png", "buffer": _square_png()}]
            )
        assert uploaded.value.status == 201
        expect(unit.locator("img.control-picture")).to_have_count(1)
        expect(unit.locator("select").nth(1)).to_have_value("canny")
        with page.expect_response(lambda r: r.url.endswith("/v1/preprocess")) as previewed:
            unit.get_by_role("button", name="Preview map").click()
        assert previewed.value.status == 200
        control_map = unit.locator("img.control-map")
        expect(control_map).to_have_count(1)
        page.wait_for_function("() => document.querySelector('img.control-map')?.naturalWidth > 0")
        assert _natural_size(control_map) == [64, 64]

        # Generate: the request carries the LoRA and the unit; the image appears.
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "4")
        with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as sent:
            page.click("#generate")
        body = json.loads(sent.value.post_data)
        assert body["loras"] == [{"name": "shapes-white-frame", "weight": 0.8}]
        (unit_body,) = body["controlnets"]
        assert unit_body["model"] == "genserve-shapes-canny"
        assert unit_body["image"].startswith("sha256:") and unit_body["preprocessor"] == "canny"
        assert (unit_body["scale"], unit_body["start"], unit_body["end"]) == (1, 0, 1)
        assert "ip_adapter" not in body
        job = page.locator("#jobs .job").first
        expect(job).to_have_attribute("data-state", "succeeded", timeout=60_000)
        expect(job.locator(".job-media img")).to_have_count(1)

        # Upscale ×2: a new job at /v1/upscale, followed to its 128×128 picture.
        with page.expect_request(lambda r: r.url.endswith("/v1/upscale") and r.method == "POST") as up:
            job.get_by_role("button", name="Upscale ×2").click()
        up_body = json.loads(up.value.post_data)
        assert up_body["upscale"] == {"model": "genserve-shapes-2x", "scale": 2}
        assert up_body["image"].startswith("data:image/png;base64,")
        upscaled = job.locator(".job-upscale img.upscaled")
        expect(upscaled).to_have_count(1, timeout=60_000)
        page.wait_for_function("() => document.querySelector('img.upscaled')?.naturalWidth > 0")
        assert _natural_size(upscaled) == [128, 128]
        browser.close()
    assert errors == []
