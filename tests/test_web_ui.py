"""The web UI end to end: headless Chromium (Debian's package, driven by Playwright) against a live server.

The browser cannot be downloaded here, so the test uses the system `chromium` through
`executable_path`. Without it (or without playwright) the tests skip with the reason, and fail
instead when GENSERVE_REQUIRE_SERVICES=1, as `.ci/run` sets. The run also writes the README
screenshot, `docs/screenshot.png`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from tests.helpers import LiveServer, keys_cli, wait_job

CHROMIUM = os.environ.get("GENSERVE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Every run makes the screenshot; it replaces the README's copy only when asked, so a test run
# does not leave the working tree dirty: GENSERVE_UPDATE_SCREENSHOT=1 make test
_ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = (
    _ROOT / "docs" / "screenshot.png"
    if os.environ.get("GENSERVE_UPDATE_SCREENSHOT") == "1"
    else _ROOT / "data" / "screenshots" / "ui.png"
)
# Other pictures the tests take, for a person to look at (never compared): picture-in, phone widths.
SHOTS = _ROOT / "data" / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
# Tiny random-weight models: 64x64 takes a few hundredths of a second a step here, 128x128 most of a
# second. The long job is canceled after a few steps; its length only keeps it running on fast hosts.
LONG_JOB = {"width": "128", "height": "128", "steps": "500"}

# Records what the page showed, from the first DOM change: a fast job's progress and previews can
# come and go between two checks of a polling assertion, a MutationObserver sees every change.
RECORDER = """
window.__seen = {progress: [], previews: []};
new MutationObserver(() => {
  for (const bar of document.querySelectorAll('[role=progressbar][aria-valuenow]')) {
    const value = Number(bar.getAttribute('aria-valuenow'));  // the step; aria-valuemax is the total
    if (window.__seen.progress.at(-1) !== value) window.__seen.progress.push(value);
  }
  for (const img of document.querySelectorAll('img.preview')) {
    if (img.src.startsWith('data:image/') && !window.__seen.previews.includes(img.src)) {
      window.__seen.previews.push(img.src);
    }
  }
}).observe(document, {subtree: true, childList: true, attributes: true,
                      attributeFilter: ['aria-valuenow', 'src']});
"""


def _unavailable(reason: str) -> None:
    if os.environ.get("GENSERVE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}, and GENSERVE_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(reason)


def require_playwright():  # noqa: ANN201 - playwright.sync_api, imported only when present
    """Playwright's sync API, or a skip (a failure under GENSERVE_REQUIRE_SERVICES=1) with the reason."""
    try:
        from playwright import sync_api
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    if not Path(CHROMIUM).is_file():
        _unavailable(f"chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    return sync_api


@pytest.fixture(scope="module")
def playwright_api():
    return require_playwright()


@pytest.fixture(scope="module")
def browser(playwright_api):
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory):
    # The tiny models, plus one whose weights are missing: its jobs fail, as a broken checkpoint would;
    # and the built-in shapes model, which draws the README screenshot.
    models = tmp_path_factory.mktemp("web-models")
    for family in ("sd15", "sdxl"):
        (models / f"tiny-{family}").symlink_to(tiny_models_dir / f"tiny-{family}")
    (models / "broken-sd15").mkdir()
    shutil.copy(tiny_models_dir / "tiny-sd15" / "model_index.json", models / "broken-sd15")
    live = LiveServer(
        models_dir=models,
        data_dir=tmp_path_factory.mktemp("web-data"),
        env={
            "GENSERVE_LIMITS__MAX_WIDTH": "256",
            "GENSERVE_LIMITS__MAX_HEIGHT": "256",
            "GENSERVE_LIMITS__MAX_STEPS": "500",
            "GENSERVE_LIMITS__MAX_INPUT_PIXELS": str(256 * 256),
            "GENSERVE_BUILTIN_MODELS": "true",
        },
    ).start()
    yield live
    live.stop()


@pytest.fixture
def api(server):
    with server.client() as client:
        yield client


@pytest.fixture
def open_page(browser, server, playwright_api):
    """Open the UI in a fresh browser context; fails the test on any uncaught script error."""
    contexts, errors = [], []

    def open_(viewport: dict = DESKTOP, color_scheme: str = "dark"):
        context = browser.new_context(viewport=viewport, color_scheme=color_scheme)
        context.add_init_script(RECORDER)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on(
            "console", lambda m: m.type == "error" and not _is_http_error(m.text) and errors.append(m.text)
        )
        page.goto(server.url)
        playwright_api.expect(page.locator("body[data-ready]")).to_have_count(1)
        return page

    yield open_
    for context in contexts:
        context.close()
    with server.client() as client:  # a failed test must not leave a long job holding the worker
        for job in client.get("/v1/jobs", params={"limit": 20}).json()["items"]:
            if job["state"] in ("queued", "running"):
                client.delete(f"/v1/jobs/{job['id']}")
    assert not errors, errors


def _is_http_error(text: str) -> bool:
    # The browser logs every 4xx/5xx response; the 422s are the point of some tests. The Experiments
    # report's frame is sandboxed without scripts, so the RECORDER init script this harness adds to
    # every frame is refused there, and Chromium logs that refusal as an error.
    return text.startswith("Failed to load resource") or (
        text.startswith("Blocked script execution in") and "frame is sandboxed" in text
    )


def _card(page, job_id: str):
    return page.locator(f'.job[data-job-id="{job_id}"]')


def _newest_card(page):
    return page.locator(".job").first


def _post_job(page):
    """Wait for the form's POST /v1/jobs: `.value.request.post_data_json` is what the page sent,
    `.value.json()["id"]` the job it made (older jobs' cards may still be first in the list)."""
    return page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/v1/jobs"))


def test_generate_shows_progress_preview_then_image_and_survives_reload(open_page, api, playwright_api):
    expect = playwright_api.expect
    page = open_page()
    page.fill("#prompt", "a lighthouse at dusk, oil painting")
    page.fill("#steps", "30")
    page.fill("#seed", "1234")
    page.press("#prompt", "Enter")  # Enter in the prompt generates

    card = _newest_card(page)
    expect(card).to_have_attribute("data-state", re.compile("queued|running|succeeded"))
    job_id = card.get_attribute("data-job-id")
    expect(card).to_have_attribute("data-state", "succeeded", timeout=60_000)

    seen = page.evaluate("window.__seen")
    steps_shown = [step for step in seen["progress"] if 0 < step < 30]
    assert len(steps_shown) >= 3 and steps_shown == sorted(steps_shown), seen["progress"]
    assert seen["previews"], "no live preview image was shown"
    assert all(src.startswith("data:image/jpeg;base64,") for src in seen["previews"])

    image = card.locator("button.thumb img")
    expect(image).to_have_attribute("src", re.compile(r"^/v1/images/"))
    page.wait_for_function("img => img.complete && img.naturalWidth === 64", arg=image.element_handle())
    expect(card).to_contain_text("seed 1234")
    assert api.get(f"/v1/jobs/{job_id}").json()["params"]["seed"] == 1234

    # Full size in the lightbox, with a download link; Esc closes it and focus goes back.
    card.locator("button.thumb").focus()
    page.keyboard.press("Enter")
    dialog = page.locator("#lightbox")
    expect(dialog).to_have_attribute("open", "")
    expect(page.locator("#lightbox-download")).to_have_attribute(
        "href", re.compile(rf"/v1/images/{job_id}-0")
    )
    page.keyboard.press("Escape")
    expect(dialog).not_to_have_attribute("open", "")
    expect(card.locator("button.thumb")).to_be_focused()

    # The gallery comes from /v1/jobs: after a reload the result is still there, image and all.
    page.reload()
    card = _card(page, job_id)
    expect(card).to_have_attribute("data-state", "succeeded")
    expect(card.locator("button.thumb img")).to_have_attribute("src", f"/v1/images/{job_id}-0")

    # Send it back to the form; reuse its seed.
    page.fill("#seed", "")
    page.fill("#prompt", "")
    card.get_by_role("button", name="Send to form").click()
    expect(page.locator("#prompt")).to_have_value("a lighthouse at dusk, oil painting")
    expect(page.locator("#steps")).to_have_value("30")
    expect(page.locator("#seed")).to_have_value("1234")
    page.fill("#seed", "")
    card.get_by_role("button", name="Reuse seed").click()
    expect(page.locator("#seed")).to_have_value("1234")


def test_queue_position_reload_resumes_live_view_and_cancel(open_page, api, playwright_api):
    expect = playwright_api.expect
    page = open_page()
    page.fill("#prompt", "a long job to cancel")
    for field, value in LONG_JOB.items():
        page.fill(f"#{field}", value)
    page.click("#generate")
    running = _newest_card(page)
    expect(running).to_have_attribute("data-state", "running", timeout=30_000)
    running_id = running.get_attribute("data-job-id")
    bar = running.get_by_role("progressbar")
    expect(bar).to_have_attribute("aria-valuemax", "500")
    expect(bar).to_have_attribute("aria-valuenow", re.compile(r"^[1-9]"), timeout=30_000)  # a step done
    expect(running.locator(".progress-text")).to_have_text(
        re.compile(r"Step \d+ of 500 · \d+% · about .+ left")
    )

    # A second job waits behind it and says where it is in the queue.
    page.fill("#prompt", "a job that waits")
    page.fill("#steps", "4")
    page.press("#prompt", "Enter")
    queued = _newest_card(page)
    expect(queued).to_have_attribute("data-state", "queued")
    queued_id = queued.get_attribute("data-job-id")
    expect(queued).to_contain_text("Queued: next in line.")

    # After a reload both jobs are followed again: the progress keeps moving.
    page.reload()
    running, queued = _card(page, running_id), _card(page, queued_id)
    expect(queued).to_contain_text("next in line")
    bar = running.get_by_role("progressbar")
    expect(bar).to_have_attribute("aria-valuenow", re.compile(r"^[1-9]"))
    before = int(bar.get_attribute("aria-valuenow"))
    page.wait_for_function(
        f"() => Number(document.querySelector('[data-job-id=\"{running_id}\"] [role=progressbar]')"
        f"?.getAttribute('aria-valuenow')) > {before}",
        timeout=30_000,
    )

    # Cancel while queued: at once. Cancel while running: at the next step.
    queued.get_by_role("button", name="Cancel").click()
    expect(queued).to_have_attribute("data-state", "canceled")
    running.get_by_role("button", name="Cancel").click()
    expect(running).to_have_attribute("data-state", "canceled", timeout=30_000)
    expect(running.get_by_role("progressbar")).to_have_count(0)
    assert api.get(f"/v1/jobs/{running_id}").json()["state"] == "canceled"
    assert api.get(f"/v1/jobs/{queued_id}").json()["state"] == "canceled"
    assert page.title() == "genserve"


def test_api_errors_show_next_to_the_field_in_plain_words(open_page, playwright_api):
    expect = playwright_api.expect
    page = open_page()
    jobs_before = page.locator(".job").count()

    page.fill("#prompt", "too wide")
    page.fill("#width", "512")
    page.press("#width", "Enter")  # Enter in any field submits the form
    expect(page.locator("#width-error")).to_have_text("Width must be at most 256 (max_width).")
    expect(page.locator("#width")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#width")).to_be_focused()

    page.fill("#width", "100")  # typing clears the old message
    expect(page.locator("#width-error")).to_be_hidden()
    page.press("#width", "Control+Enter")
    expect(page.locator("#width-error")).to_have_text("Must be a multiple of 8.")

    page.fill("#width", "64")
    page.fill("#prompt", "")
    page.fill("#steps", "501")
    page.click("#generate")
    expect(page.locator("#prompt-error")).to_have_text("Write a prompt first.")
    expect(page.locator("#prompt")).to_be_focused()
    expect(page.locator("#width-error")).to_be_hidden()
    assert page.locator(".job").count() == jobs_before  # nothing was queued


def test_failed_job_shows_its_error_on_the_card(open_page, playwright_api):
    expect = playwright_api.expect
    page = open_page()
    page.select_option("#model", "broken-sd15")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#prompt", "a model with no weights")
    page.press("#prompt", "Enter")
    card = _newest_card(page)
    expect(card).to_have_attribute("data-state", "failed", timeout=60_000)
    expect(card.locator(".job-error")).to_contain_text("The job failed: could not load model 'broken-sd15'")


def test_model_picker_switches_size_presets_to_the_family(open_page, playwright_api):
    expect = playwright_api.expect
    page = open_page()
    options = page.locator("#model option")
    expect(options).to_have_count(4)
    expect(page.locator("#model")).to_have_value("tiny-sd15")  # the server's default model
    expect(page.locator("#cfg_scale")).to_have_value("7")
    # Samplers come from the OpenAPI contract.
    expect(page.locator("#sampler option")).to_have_count(6)
    chips = page.locator("#size-presets .chip")
    expect(chips.filter(has_text="4:3")).to_contain_text("88×64")  # SD1.5: the short side stays native

    page.locator("#size-presets .chip", has_text="4:3").click()
    expect(page.locator("#width")).to_have_value("88")
    page.select_option("#model", "tiny-sdxl")
    expect(chips.filter(has_text="4:3")).to_contain_text("72×56")  # SDXL: equal-area buckets
    # The same aspect ratio at the new family's size.
    expect(page.locator("#width")).to_have_value("72")
    expect(page.locator("#height")).to_have_value("56")
    page.locator("#size-presets .chip", has_text="1:1").click()
    expect(page.locator("#width")).to_have_value("64")
    # Each model brings its own guidance default: the shapes model's card says 4.
    page.select_option("#model", "genserve-shapes")
    expect(page.locator("#cfg_scale")).to_have_value("4")
    page.select_option("#model", "tiny-sd15")
    expect(page.locator("#cfg_scale")).to_have_value("7")


def test_model_defaults_follow_the_model_unless_the_user_set_them(open_page, api, playwright_api):
    """Issue 15: the form sent CFG 7 for genserve-shapes, whose model card (and the API) says 4."""
    expect = playwright_api.expect
    shapes = {m["name"]: m for m in api.get("/v1/models").json()["data"]}["genserve-shapes"]
    assert shapes["default_cfg_scale"] == 4.0
    page = open_page()
    # What an earlier version of the page remembered: the old global CFG 7 beside the shapes model.
    page.evaluate(
        "localStorage.setItem('genserve.form.v1', JSON.stringify("
        "{model: 'genserve-shapes', cfg_scale: '7', steps: '20', sampler: 'euler'}))"
    )
    page.reload()
    expect(page.locator("body[data-ready]")).to_have_count(1)
    expect(page.locator("#model")).to_have_value("genserve-shapes")
    expect(page.locator("#cfg_scale")).to_have_value("4")

    page.fill("#prompt", "a yellow star on a blue background")
    page.fill("#steps", "4")
    with _post_job(page) as sent:
        page.press("#prompt", "Enter")
    body = sent.value.request.post_data_json
    assert body["model"] == "genserve-shapes" and body["cfg_scale"] == 4, body
    job_id = sent.value.json()["id"]
    expect(_card(page, job_id)).to_have_attribute("data-state", "succeeded", timeout=60_000)
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["params"]["cfg_scale"] == 4.0

    # Another model brings its own default; a value the user typed stays theirs, across model
    # switches and reloads; typing the model's default again hands the field back to the model.
    page.select_option("#model", "tiny-sd15")
    expect(page.locator("#cfg_scale")).to_have_value("7")
    expect(page.locator("#steps")).to_have_value("4")  # the user's, and no model names its own steps
    page.fill("#cfg_scale", "5.5")
    page.select_option("#model", "genserve-shapes")
    expect(page.locator("#cfg_scale")).to_have_value("5.5")
    page.reload()
    expect(page.locator("body[data-ready]")).to_have_count(1)
    expect(page.locator("#cfg_scale")).to_have_value("5.5")
    page.fill("#cfg_scale", "4")
    page.select_option("#model", "tiny-sd15")
    expect(page.locator("#cfg_scale")).to_have_value("7")
    page.reload()
    expect(page.locator("body[data-ready]")).to_have_count(1)
    page.select_option("#model", "genserve-shapes")
    expect(page.locator("#cfg_scale")).to_have_value("4")


def _png(width: int, height: int, background=(40, 90, 200), square=(200, 40, 40)) -> bytes:
    """A plain background with a square in the middle third."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), background)
    ImageDraw.Draw(image).rectangle(
        (width // 3, height // 3, 2 * width // 3 - 1, 2 * height // 3 - 1), fill=square
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _picture_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canvas_point(page, x: float, y: float) -> tuple[float, float]:
    """Page coordinates of the middle of pixel (x, y) of the mask canvas."""
    box = page.locator("#mask").bounding_box()
    width, height = page.evaluate(
        "[document.querySelector('#mask').width, document.querySelector('#mask').height]"
    )
    return box["x"] + (x + 0.5) * box["width"] / width, box["y"] + (y + 0.5) * box["height"] / height


def test_inpaint_from_the_page_upload_paint_a_mask_and_run(open_page, api, playwright_api):
    """Issue 16 item 9: choose a picture (uploaded), paint a mask with the mouse, erase part of it,
    send an inpainting job; the request carries both pictures by upload id, the mask is white where
    painted and has the picture's size, and the job runs to a result. Send to form brings both back."""
    from PIL import Image

    expect = playwright_api.expect
    page = open_page()
    picture = _png(64, 64)
    expect(page.locator("#strength")).to_be_hidden()  # no picture, no strength
    with page.expect_response(lambda r: r.url.endswith("/v1/uploads")) as uploaded:
        page.set_input_files(
            "#init_image", files=[{"name": "square.png", "mimeType": "image/png", "buffer": picture}]
        )
    assert uploaded.value.status == 201
    expect(page.locator("#picture-info")).to_have_text("square.png · 64×64 PNG · uploaded")
    expect(page.locator("#strength")).to_be_visible()
    expect(page.locator("#picture-mode")).to_contain_text("img2img")
    assert page.evaluate(
        "[document.querySelector('#mask').width, document.querySelector('#mask').height]"
    ) == [64, 64]
    # The size comes from the picture: width and height are left to the server.
    expect(page.locator("#width")).to_have_value("")
    expect(page.locator("#width")).to_have_attribute("placeholder", "64")
    expect(page.locator("#size-presets .chip", has_text="Picture").locator("input")).to_be_checked()

    # Paint a stroke across the square with the mouse, then erase its right end.
    page.fill("#brush-size", "6")
    page.mouse.move(*_canvas_point(page, 24, 32))
    page.mouse.down()
    page.mouse.move(*_canvas_point(page, 40, 32), steps=8)
    page.mouse.up()
    expect(page.locator("#picture-mode")).to_contain_text("Inpainting")
    page.locator(".segmented label", has_text="Eraser").click()
    page.mouse.click(*_canvas_point(page, 40, 32))

    page.fill("#prompt", "a yellow star")
    page.fill("#steps", "4")
    page.fill("#strength", "1")
    with _post_job(page) as sent:
        page.press("#prompt", "Enter")
    body = sent.value.request.post_data_json
    assert sent.value.status == 202, sent.value.text()
    assert body["init_image"] == _picture_id(picture)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", body["mask"]) and body["mask"] != body["init_image"]
    assert body["strength"] == 1 and "width" not in body and "height" not in body
    mask = Image.open(io.BytesIO(api.get(f"/v1/uploads/{body['mask']}").content)).convert("L")
    assert mask.size == (64, 64)
    assert mask.getpixel((24, 32)) == 255 and mask.getpixel((32, 32)) == 255  # painted
    assert mask.getpixel((40, 32)) == 0  # erased
    assert mask.getpixel((5, 5)) == 0 and mask.getpixel((32, 20)) == 0  # never painted

    card = _card(page, sent.value.json()["id"])
    expect(card).to_have_attribute("data-state", "succeeded", timeout=60_000)
    expect(card.locator(".job-params")).to_contain_text("inpaint 1")
    job = api.get(f"/v1/jobs/{sent.value.json()['id']}").json()
    assert job["params"]["init_image"] == body["init_image"] and job["params"]["mask"] == body["mask"]
    assert (job["params"]["width"], job["params"]["height"]) == (64, 64) and len(job["images"]) == 1
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("document.activeElement.blur()")
    page.screenshot(path=str(SHOTS / "picture-in.png"))

    # A reload forgets the picture (the size, left to the picture, goes back to the model's own);
    # Send to form brings the picture and the mask back, and the same mask gets the same upload id.
    page.reload()
    expect(page.locator("body[data-ready]")).to_have_count(1)
    expect(page.locator("#picture-editor")).to_be_hidden()
    expect(page.locator("#width")).to_have_value("64")
    expect(page.locator("#height")).to_have_value("64")
    card.get_by_role("button", name="Send to form").click()
    expect(page.locator("#picture-info")).to_contain_text("64×64 PNG · stored")
    expect(page.locator("#picture-mode")).to_contain_text("Inpainting")
    expect(page.locator("#strength-value")).to_have_text("1.00")
    # The mask options: blur, what the masked area starts from, only the masked area with padding.
    page.locator("#inpaint-options summary").click()
    expect(page.locator("#inpaint-only_masked_padding")).to_be_disabled()
    page.fill("#inpaint-mask_blur", "2")
    page.select_option("#inpaint-fill", "fill")
    page.check("#inpaint-only_masked")
    page.fill("#inpaint-only_masked_padding", "8")
    with _post_job(page) as sent_again:
        page.press("#prompt", "Enter")
    again = sent_again.value.request.post_data_json
    assert (again["init_image"], again["mask"]) == (body["init_image"], body["mask"])
    assert again["inpaint"] == {"mask_blur": 2, "fill": "fill", "only_masked": True, "only_masked_padding": 8}
    expect(_card(page, sent_again.value.json()["id"])).to_have_attribute(
        "data-state", "succeeded", timeout=60_000
    )


def test_paste_drop_use_as_input_and_picture_errors_next_to_their_fields(open_page, api, playwright_api):
    expect = playwright_api.expect
    first = api.post("/v1/jobs", json={"prompt": "a result to start from", "steps": 4, "seed": 7}).json()
    wait_job(api, first["id"])
    page = open_page()

    # Paste a picture (as a browser's clipboard hands it over), then drop another on the form.
    pasted, dropped = _png(32, 48), _png(48, 32, background=(20, 160, 60))
    give = """([b64, type, target]) => {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const data = new DataTransfer();
      data.items.add(new File([bytes], 'picture.png', {type: 'image/png'}));
      const event = type === 'paste'
        ? new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true})
        : new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true});
      document.querySelector(target).dispatchEvent(event);
    }"""
    page.evaluate(give, [base64.b64encode(pasted).decode(), "paste", "#prompt"])
    expect(page.locator("#picture-info")).to_have_text("pasted picture · 32×48 PNG · uploaded")
    expect(page.locator("#width")).to_have_attribute("placeholder", "32")
    page.evaluate(give, [base64.b64encode(dropped).decode(), "drop", "#picture-stage"])
    expect(page.locator("#picture-info")).to_have_text("picture.png · 48×32 PNG · uploaded")
    expect(page.locator("#height")).to_have_attribute("placeholder", "32")

    # Use as input: the result's own bytes become the input picture.
    card = _card(page, first["id"])
    card.get_by_role("button", name="Use as input").click()
    expect(page.locator("#picture-info")).to_have_text("result of seed 7 · 64×64 PNG · uploaded")
    result = api.get(f"/v1/images/{first['id']}-0").content
    page.fill("#prompt", "the same, changed a little")
    page.fill("#steps", "4")
    page.fill("#strength", "0.5")
    expect(page.locator("#strength-hint")).to_contain_text("Runs the last 2 of 4 steps")
    with _post_job(page) as sent:
        page.press("#prompt", "Enter")
    body = sent.value.request.post_data_json
    assert body["init_image"] == _picture_id(result) and body["strength"] == 0.5 and "mask" not in body
    changed = _card(page, sent.value.json()["id"])
    expect(changed).to_have_attribute("data-state", "succeeded", timeout=60_000)
    expect(changed.locator(".job-params")).to_contain_text("img2img 0.5")

    # The lightbox has it too.
    changed.locator("button.thumb").click()
    page.locator("#lightbox-use").click()
    expect(page.locator("#lightbox")).not_to_have_attribute("open", "")
    expect(page.locator("#picture-info")).to_contain_text(
        re.compile(r"^result of seed \d+ · 64×64 PNG · uploaded$")
    )

    # The API's errors land next to the field they name.
    page.locator("#outpaint-options summary").click()
    page.fill("#outpaint-right", "12")
    page.check("#hires")
    page.fill("#hires-scale", "5")
    page.click("#generate")
    expect(page.locator("#outpaint-error")).to_have_text("Right: must be a multiple of 8.")
    expect(page.locator("#outpaint-right")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#hires-error")).to_have_text("Scale: must be at most 4.")
    page.fill("#outpaint-right", "16")
    expect(page.locator("#outpaint-error")).to_be_hidden()
    expect(page.locator("#width")).to_have_attribute("placeholder", "80")  # 64 + 16
    page.uncheck("#hires")
    # Outpainting runs: the canvas grows by the margin.
    with _post_job(page) as sent:
        page.click("#generate")
    assert sent.value.request.post_data_json["outpaint"] == {
        "left": 0,
        "top": 0,
        "right": 16,
        "bottom": 0,
        "feather": 8,
    }
    outpainted = _card(page, sent.value.json()["id"])
    expect(outpainted).to_have_attribute("data-state", "succeeded", timeout=60_000)
    expect(outpainted.locator(".job-params")).to_contain_text("80×64")
    expect(outpainted.locator(".job-params")).to_contain_text("outpaint 0.5")
    page.fill("#steps", "2")
    page.fill("#strength", "0.3")
    expect(page.locator("#strength-hint")).to_contain_text("Runs no step of 2")
    page.click("#generate")
    expect(page.locator("#strength-error")).to_contain_text("runs no step")
    expect(page.locator("#strength")).to_be_focused()
    # Pictures the server refuses: the reason shows under the picture, and the slot stays empty.
    page.get_by_role("button", name="Remove").click()
    page.set_input_files(
        "#init_image", files=[{"name": "big.png", "mimeType": "image/png", "buffer": _png(300, 300)}]
    )
    expect(page.locator("#init_image-error")).to_have_text(
        "The picture is 300x300 = 90000 pixels; the limit is 65536 (max_input_pixels)."
    )
    expect(page.locator("#picture-editor")).to_be_hidden()
    page.set_input_files(
        "#init_image", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not a picture"}]
    )
    expect(page.locator("#init_image-error")).to_have_text("The browser cannot read that file as a picture.")
    expect(page.locator("#picture-editor")).to_be_hidden()


def test_hires_toggle_sends_a_second_pass(open_page, playwright_api):
    """The hires options reach the API, the job runs both passes, and the API's refusal of hires with
    an input picture shows under the toggle."""
    expect = playwright_api.expect
    page = open_page()
    expect(page.locator("#hires-options")).to_be_hidden()
    page.check("#hires")
    expect(page.locator("#hires-size")).to_have_text("64×64, then 128×128.")
    page.fill("#prompt", "a second, larger pass")
    page.fill("#steps", "4")
    page.fill("#hires-steps", "2")
    page.select_option("#hires-upscaler", "lanczos")
    with _post_job(page) as sent:
        page.press("#prompt", "Enter")
    response = sent.value
    assert response.request.post_data_json["hires"] == {
        "scale": 2,
        "steps": 2,
        "strength": 0.55,
        "upscaler": "lanczos",
    }
    assert response.status == 202, response.text()
    card = _card(page, response.json()["id"])
    expect(card).to_have_attribute("data-state", "succeeded", timeout=60_000)
    expect(card.locator(".job-params")).to_contain_text("hires ×2")
    image = card.locator("button.thumb img")
    page.wait_for_function("img => img.complete && img.naturalWidth === 128", arg=image.element_handle())

    card.get_by_role("button", name="Use as input").click()
    expect(page.locator("#picture-info")).to_contain_text("128×128 PNG · uploaded")
    page.click("#generate")
    expect(page.locator("#hires-error")).to_contain_text("init_image")
    expect(page.locator("#hires")).to_have_attribute("aria-invalid", "true")


def test_phone_width_stacks_without_horizontal_scroll(open_page, api, playwright_api):
    prompt = "a quiet harbour town at dawn, fishing boats, mist over the water, watercolour, pastel palette"
    job = api.post("/v1/jobs", json={"prompt": prompt, "steps": 4, "num_images": 2}).json()
    wait_job(api, job["id"])
    page = open_page(viewport=PHONE)
    playwright_api.expect(_card(page, job["id"])).to_have_attribute("data-state", "succeeded")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    form, results = page.locator("#generate-form").bounding_box(), page.locator(".results").bounding_box()
    assert form["y"] + form["height"] <= results["y"], "the form comes first, the results below it"
    assert results["x"] + results["width"] <= PHONE["width"]
    # With a picture in, its tools fit the width too.
    page.set_input_files(
        "#init_image", files=[{"name": "wide.png", "mimeType": "image/png", "buffer": _png(96, 64)}]
    )
    playwright_api.expect(page.locator("#picture-info")).to_contain_text("uploaded")
    page.locator("#outpaint-options summary").click()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    stage = page.locator("#picture-stage").bounding_box()
    assert stage["x"] >= 0 and stage["x"] + stage["width"] <= PHONE["width"]
    tops = page.evaluate(
        "[...document.querySelectorAll('.picture-bar > :not(.spacer)')].map(e => e.offsetTop)"
    )
    assert len(set(tops)) == 1, "Invert, Clear, Replace and Remove share one row"
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.locator("#picture-field").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "phone-picture-in.png"))


def test_readme_screenshot(open_page, api, playwright_api):
    """docs/screenshot.png: finished results in the gallery, and an inpainting job set up in the form
    (its result first in the gallery), at desktop width."""
    prompts = [
        ("a yellow star on a blue background", 2),
        ("a small red circle at the top left on a black background", 1),
        ("a big white triangle on a green background", 1),
    ]
    for index, (prompt, count) in enumerate(prompts):
        body = {
            "prompt": prompt,
            "model": "genserve-shapes",
            "seed": 40 + index,
            "num_images": count,
        }
        wait_job(api, api.post("/v1/jobs", json=body).json()["id"])
    expect = playwright_api.expect
    page = open_page()
    newest = _newest_card(page)
    expect(newest).to_have_attribute("data-state", "succeeded")
    # Inpaint the triangle's picture: a star where the mask is painted.
    newest.get_by_role("button", name="Send to form").click()
    newest.get_by_role("button", name="Use as input").click()
    expect(page.locator("#picture-info")).to_contain_text("uploaded")
    page.fill("#brush-size", "12")
    page.mouse.move(*_canvas_point(page, 38, 8))
    page.mouse.down()
    for x, y in ((58, 8), (58, 18), (38, 18), (38, 28), (58, 28)):
        page.mouse.move(*_canvas_point(page, x, y), steps=6)
    page.mouse.up()
    page.fill("#prompt", "a yellow star on a green background")
    page.fill("#negative_prompt", "blurry, low quality")
    page.fill("#strength", "0.9")
    with _post_job(page) as sent:
        page.click("#generate")
    expect(_card(page, sent.value.json()["id"])).to_have_attribute("data-state", "succeeded", timeout=60_000)
    page.wait_for_function("[...document.querySelectorAll('.job img')].every(img => img.complete)")
    page.evaluate("document.activeElement.blur(); document.querySelector('#generate-form').scrollTop = 0")
    page.mouse.move(0, DESKTOP["height"] - 1)  # no hover highlight in the picture
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000


def test_with_auth_on_the_page_asks_for_a_key_and_then_works_with_it(
    browser, tiny_models_dir, tmp_path, playwright_api
):
    # A server on a public address turns auth on by itself: its UI must still be usable.
    data_dir = tmp_path / "data"
    created = keys_cli(data_dir, "create", "web-user")
    assert created.exit_code == 0, created.output
    token = created.stdout.strip().splitlines()[-1]
    live = LiveServer(models_dir=tiny_models_dir, data_dir=data_dir, env={"GENSERVE_AUTH": "on"}).start()
    expect = playwright_api.expect
    context = browser.new_context(viewport=DESKTOP)
    context.add_init_script(RECORDER)
    try:
        page = context.new_page()
        page.goto(live.url)
        expect(page.locator("body[data-needs-key]")).to_have_count(1)
        expect(page.get_by_role("heading", name="This server needs an API key")).to_be_visible()
        expect(page.locator("#api-key")).to_be_focused()

        page.fill("#api-key", "not a key!")
        page.press("#api-key", "Enter")
        expect(page.locator("#api-key-error")).to_have_text(re.compile("That is not an API key"))
        page.fill("#api-key", "gs_000000000000_" + "x" * 43)
        page.get_by_role("button", name="Use key").click()
        expect(page.locator("#api-key-error")).to_have_text(re.compile("That key was not accepted"))

        page.fill("#api-key", token)
        page.get_by_role("button", name="Use key").click()
        expect(page.locator("body[data-ready]")).to_have_count(1)
        expect(page.locator("#key-form")).to_be_hidden()
        expect(page.locator("#model")).to_have_value("tiny-sd15")

        # Generating streams progress (the event stream authenticates with the key's cookie) and
        # shows the image (so does the image request).
        page.fill("#prompt", "a lighthouse behind a login")
        page.fill("#steps", "30")
        page.press("#prompt", "Enter")
        card = _newest_card(page)
        expect(card).to_have_attribute("data-state", "succeeded", timeout=60_000)
        steps_shown = [step for step in page.evaluate("window.__seen.progress") if 0 < step < 30]
        assert len(steps_shown) >= 3, steps_shown
        image = card.locator("button.thumb img")
        page.wait_for_function("img => img.complete && img.naturalWidth === 64", arg=image.element_handle())
        # Pictures in work with the key too: the result is read back and uploaded.
        card.get_by_role("button", name="Use as input").click()
        expect(page.locator("#picture-info")).to_contain_text("64×64 PNG · uploaded")

        # The key stays in this browser across a reload, until the user forgets it.
        page.reload()
        expect(page.locator("body[data-ready]")).to_have_count(1)
        expect(_newest_card(page)).to_have_attribute("data-state", "succeeded")

        # Revoked while the page is open: the next poll asks for a key again; a new one starts afresh.
        key_id = token.split("_")[1]  # gs_<key id>_<secret>
        assert keys_cli(data_dir, "revoke", key_id).exit_code == 0
        expect(page.locator("body[data-needs-key]")).to_have_count(1, timeout=15_000)
        expect(page.locator("#api-key-error")).to_have_text(re.compile("The key no longer works"))
        fresh = keys_cli(data_dir, "create", "web-user-2").stdout.strip().splitlines()[-1]
        page.fill("#api-key", fresh)
        page.get_by_role("button", name="Use key").click()
        expect(page.locator("body[data-ready]")).to_have_count(1)
        expect(page.locator("#key-form")).to_be_hidden()
        expect(page.locator(".job")).to_have_count(0)  # the revoked key's jobs are not this key's
        page.get_by_role("button", name="Forget API key").click()
        expect(page.locator("body[data-needs-key]")).to_have_count(1)
        assert page.evaluate("document.cookie") == ""
    finally:
        context.close()
        live.stop()


def test_page_and_assets_are_served_from_the_package(server):
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    links = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert "/static/app.js" in links
    assert all(link.startswith(("/", "#")) for link in links), f"no CDN, every asset is local: {links}"
    script = httpx.get(server.url + "/static/app.js", timeout=10)
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert httpx.get(server.url + "/static/../api/app.py", timeout=10).status_code == 404
