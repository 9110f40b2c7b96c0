"""The web UI's Video tab end to end: headless Chromium (Debian's, through Playwright) against a live
server with a tiny LTX video model and a tiny SD1.5 image model. A text-to-video request from the
page runs to a playable clip; the page shows its stages, its progress to 100 % and the player; a
refused request shows its error next to the field. Skips like tests/test_web_ui.py without a browser.
"""

from __future__ import annotations

import pytest

from tests.helpers import LiveServer
from tests.test_web_ui import CHROMIUM, SHOTS, _is_http_error, require_playwright


@pytest.fixture(scope="module")
def playwright_api():
    return require_playwright()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from genserve.engine.models.fixtures import write_tiny_pipeline
    from genserve.engine.models.video_fixtures import write_tiny_video_pipeline

    models = tmp_path_factory.mktemp("web-video-models")
    write_tiny_pipeline("sd15", models / "tiny-sd15")
    write_tiny_video_pipeline("ltx", models / "tiny-ltx")
    live = LiveServer(
        models_dir=models,
        data_dir=tmp_path_factory.mktemp("web-video-data"),
        env={"GENSERVE_DEFAULT_VIDEO_MODEL": "tiny-ltx", "GENSERVE_WORKERS": "1"},
    ).start()
    yield live
    live.stop()


def test_video_tab_makes_a_clip_with_live_progress_and_a_player(playwright_api, server):
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
        # The image form lists image models only; the video form the video ones, default chosen.
        assert page.locator("#model option").all_inner_texts()[0].startswith("tiny-sd15")
        page.click("#tab-video")
        expect(page.locator("#video-page")).to_be_visible()
        expect(page.locator("#image-page")).to_be_hidden()
        assert page.url.endswith("#video")
        expect(page.locator("#video-model")).to_have_value("tiny-ltx")
        modes = page.locator("#video-mode option").evaluate_all("options => options.map(o => o.value)")
        assert modes[0] == "t2v" and "keyframes" in modes
        assert page.input_value("#video-fps") != "" and page.input_value("#video-num_frames") != ""

        # Keyframe slots follow the mode: flf2v has a first and a last picture.
        page.select_option("#video-mode", "flf2v")
        expect(page.locator("#video-keyframes li")).to_have_count(2)
        page.select_option("#video-mode", "t2v")
        expect(page.locator("#video-keyframes-field")).to_be_hidden()

        # A frame count the family refuses: the server's words, next to the field.
        page.fill("#video-prompt", "a red ball bounces")
        for field, value in (
            ("num_frames", "10"),
            ("width", "32"),
            ("height", "32"),
            ("steps", "2"),
            ("seed", "3"),
        ):
            page.fill(f"#video-{field}", value)
        page.click("#video-generate")
        expect(page.locator("#video-num_frames-error")).to_contain_text("8N+1")
        expect(page.locator("#video-num_frames")).to_have_attribute("aria-invalid", "true")

        page.fill("#video-num_frames", "9")
        page.select_option("#video-output-container", "webm")
        page.click("#video-generate")
        card = page.locator(".video-job").first
        expect(card).to_have_attribute("data-state", "succeeded", timeout=90_000)
        player = card.locator("video.video-player")
        expect(player).to_have_count(1)
        page.wait_for_function(
            "v => v.readyState >= 1 && v.duration > 0 && !v.error",
            arg=player.element_handle(),
            timeout=20_000,
        )
        assert player.evaluate("v => v.muted && v.loop && v.controls && v.autoplay")
        src = player.get_attribute("src")
        assert src.startswith("/v1/video/files/") and src.endswith(".webm")
        assert card.locator("a[data-action=download]").get_attribute("href") == src
        assert "encode" in card.get_attribute("data-stages").split()
        assert card.get_attribute("data-percent") == "100"
        report = card.locator(".video-report").inner_text()
        assert "Frames" in report and "9" in report and "flicker index" in report
        expect(page.locator("#video-form-error")).to_be_hidden()
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=SHOTS / "video.png")  # for a person to look at, never compared

        # A reload on #video opens the tab again and lists the clip.
        page.reload()
        expect(page.locator("#video-page")).to_be_visible()
        expect(page.locator(".video-job[data-state=succeeded] video.video-player")).to_have_count(1)
        browser.close()
    assert not errors, errors
