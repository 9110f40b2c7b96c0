"""ComfyUI's HTTP API and websocket on a live server, with a real ComfyUI client from PyPI
(comfy-api-simplified) and a plain websocket client, on the built-in genserve-shapes model."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
import pytest
from comfy_api_simplified import ComfyApiWrapper
from comfy_api_simplified.exceptions import ComfyApiError
from websockets.sync.client import connect

from genserve.engine.models.registry import BUILTIN_MODELS_DIR
from genserve.toymodel import dataset
from genserve.toymodel.pixels import measure
from genserve.toymodel.shapes_classifier import classify_shapes, load_classifier
from tests.helpers import LiveServer
from tests.test_web_ui import CHROMIUM, _is_http_error, require_playwright
from tests.workflow_graphs import img2img, txt2img, txt2video, with_hires, with_scale


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("comfy")
    (root / "models").mkdir()
    env = {"GENSERVE_BUILTIN_MODELS": "true", "GENSERVE_DEFAULT_MODEL": "genserve-shapes"}
    live = LiveServer(root / "models", root / "data", env=env).start()
    yield live
    live.kill_all()  # nothing to keep: a graceful stop would only cost seconds


def wait_history(client: httpx.Client, prompt_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = client.get(f"/history/{prompt_id}").json()
        if found:
            return found[prompt_id]
        time.sleep(0.1)
    raise TimeoutError(prompt_id)


def job_count(client: httpx.Client) -> int:
    return client.get("/v1/jobs", params={"limit": 1}).json()["total"]


def test_a_comfyui_client_runs_txt2img_and_gets_the_prompted_shape(server: LiveServer) -> None:
    """ComfyUI's default graph, 4 images of "a red star on a black background": the shape
    classifier and the pixel measurements the held-out tests use find red stars on black."""
    api = ComfyApiWrapper(server.url)
    graph = txt2img("a red star on a black background", seed=3, steps=16, batch=4)
    images = api.queue_and_wait_images(graph, "Save Image")
    pictures = [np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB")) for data in images.values()]
    assert len(pictures) == 4 and all(p.shape == (64, 64, 3) for p in pictures)
    folder = BUILTIN_MODELS_DIR / "genserve-shapes"
    shapes = classify_shapes(load_classifier(folder / "eval" / "shape_classifier.safetensors"), pictures)
    good = sum(
        (shape, measure(p).fg, measure(p).bg) == ("star", "red", "black")
        for shape, p in zip(shapes, pictures, strict=True)
    )
    assert good >= 3, (shapes, [measure(p) for p in pictures])
    assert set(api.get_queue()) == {"queue_running", "queue_pending"}


def test_a_rerun_with_only_the_last_node_changed_samples_nothing(server: LiveServer) -> None:
    with server.client() as client:
        first = client.post("/prompt", json={"prompt": with_scale(txt2img(seed=11, steps=4), 32, 32)}).json()
        done = wait_history(client, first["prompt_id"])
        assert done["status"]["completed"]
        before = job_count(client)
        # Another SaveImage prefix and another ImageScale after VAEDecode: no sampling job.
        again = client.post(
            "/prompt", json={"prompt": with_scale(txt2img(seed=11, steps=4, prefix="x/y"), 48, 40)}
        )
        rerun = wait_history(client, again.json()["prompt_id"])
        assert job_count(client) == before
        cached = [m for kind, m in rerun["status"]["messages"] if kind == "execution_cached"]
        assert ["3", "8"] in [m["nodes"] for m in cached]
        (saved,) = rerun["outputs"]["9"]["images"]
        assert saved["subfolder"] == "x" and saved["filename"].startswith("y_")
        picture = PIL.Image.open(io.BytesIO(client.get("/view", params=saved).content))
        assert picture.size == (48, 40)
        # An output loaded back ("<name> [output]", as ComfyUI's LoadImage allows) starts an img2img.
        chained = img2img(f"{saved['filename']} [output]", "a red circle on a blue background", 0.5, steps=4)
        loaded = wait_history(client, client.post("/prompt", json={"prompt": chained}).json()["prompt_id"])
        assert loaded["status"]["completed"] and job_count(client) == before + 1
        newest = client.get("/v1/jobs", params={"limit": 1}).json()["items"][0]["params"]
        assert (newest["width"], newest["height"], newest["init_image"][:7]) == (48, 40, "sha256:")
        before += 1
        # A new seed samples again: one new job.
        third = client.post("/prompt", json={"prompt": with_scale(txt2img(seed=12, steps=4), 48, 40)}).json()
        wait_history(client, third["prompt_id"])
        assert job_count(client) == before + 1


def run_on_socket(server: LiveServer, body: dict) -> tuple[str, list[dict], list[bytes]]:
    """Queue `body` with client id "plain-client" and read its socket to the end of the prompt."""
    ws_url = server.url.replace("http", "ws") + "/ws?clientId=plain-client"
    with connect(ws_url) as socket, server.client() as client:
        hello = json.loads(socket.recv(timeout=10))
        assert hello["type"] == "status" and hello["data"]["sid"] == "plain-client"
        prompt_id = client.post("/prompt", json={**body, "client_id": "plain-client"}).json()["prompt_id"]
        messages, frames = [], []
        while True:
            message = socket.recv(timeout=60)
            if isinstance(message, bytes):
                frames.append(message)
                continue
            messages.append(json.loads(message))
            if messages[-1]["type"] == "executing" and messages[-1]["data"]["node"] is None:
                return prompt_id, messages, frames


def test_the_websocket_reports_each_node_progress_and_previews(server: LiveServer) -> None:
    body = {  # with a hires pass: KSampler -> LatentUpscale -> KSampler, one job
        "prompt": with_hires(txt2img("a green square on a white background", seed=21, steps=6), 96, 0.5, 4),
        "extra_data": {"preview_method": "auto"},
    }
    prompt_id, messages, frames = run_on_socket(server, body)
    kinds = [m["type"] for m in messages]
    assert kinds.index("execution_start") < kinds.index("executing") < kinds.index("progress")
    mine = [m["data"] for m in messages if m["type"] != "status"]
    assert all(data["prompt_id"] == prompt_id for data in mine)
    progress = [m["data"] for m in messages if m["type"] == "progress"]
    assert progress[-1] == {"value": 10, "max": 10, "node": "12", "prompt_id": prompt_id}  # 6 + 4 steps
    (executed,) = [m["data"] for m in messages if m["type"] == "executed"]
    assert executed["node"] == "9" and executed["output"]["images"][0]["type"] == "output"
    with server.client() as client:
        saved = client.get("/view", params=executed["output"]["images"][0]).content
    assert PIL.Image.open(io.BytesIO(saved)).size == (96, 96)
    assert frames and all(frame[:4] == b"\x00\x00\x00\x01" for frame in frames)
    kind = int.from_bytes(frames[0][4:8], "big")
    assert PIL.Image.open(io.BytesIO(frames[0][8:])).format == {1: "JPEG", 2: "PNG"}[kind]
    # Not asked for (ComfyUI's default preview method is none): progress, but no binary frames.
    _, messages, frames = run_on_socket(server, {"prompt": txt2img(seed=22, steps=4)})
    assert frames == [] and [m["data"]["value"] for m in messages if m["type"] == "progress"] == [1, 2, 3, 4]


def test_upload_image_and_img2img_from_it(server: LiveServer, tmp_path: Path) -> None:
    """A red circle uploaded with the client, changed to green at denoise 0.6 (the shape stays)."""
    scene = dataset.Scene("circle", "red", "blue", "top left", "large")
    path = tmp_path / "red.png"
    dataset.draw_scene(scene, 64).save(path)
    api = ComfyApiWrapper(server.url)
    uploaded = api.upload_image(path, subfolder="")
    assert uploaded == {"name": "red.png", "subfolder": "", "type": "input"}
    assert api.get_image("red.png", "", "input") == path.read_bytes()
    graph = img2img("red.png", "a green circle on a blue background", 0.6)
    # Then genserve's upscaler (an upscale job, as POST /v1/upscale makes): 64 -> 128.
    graph["20"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "genserve-shapes-2x.pth"}}
    graph["21"] = {
        "class_type": "ImageUpscaleWithModel",
        "inputs": {"upscale_model": ["20", 0], "image": ["8", 0]},
    }
    graph["9"]["inputs"]["images"] = ["21", 0]
    (data,) = api.queue_and_wait_images(graph, "Save Image").values()
    picture = PIL.Image.open(io.BytesIO(data)).convert("RGB")
    assert picture.size == (128, 128)
    m = measure(np.asarray(picture.resize((64, 64))))
    assert (m.fg, m.bg, m.position) == ("green", "blue", "top left")
    with server.client() as client:
        items = client.get("/v1/jobs", params={"limit": 5}).json()["items"]  # newest first
        job = next(item for item in items if item["params"].get("init_image"))
        assert job["params"]["init_image"].startswith("sha256:")
        assert (job["params"]["steps"], job["params"]["strength"]) == (16, 10.5 / 16)  # denoise 0.6 of 10


def test_inpainting_with_a_mask_from_the_mask_editor_upload(server: LiveServer) -> None:
    """/upload/mask puts a mask's alpha on an uploaded picture; LoadImage's MASK (1 - alpha) goes to
    VAEEncodeForInpaint: only the transparent corner is repainted, the red circle elsewhere stays
    (a run that ignored the mask would draw the prompt's green circle anew)."""
    scene = dataset.draw_scene(dataset.Scene("circle", "red", "blue", "top left", "large"), 64)
    mask = PIL.Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (32, 32, 64, 64))  # transparent: repaint the bottom-right corner
    files = []
    for picture in (scene, mask):
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        files.append(buffer.getvalue())
    with server.client() as client:
        client.post("/upload/image", files={"image": ("scene.png", files[0])}, data={"overwrite": "true"})
        ref = json.dumps({"filename": "scene.png", "subfolder": "", "type": "input"})
        uploaded = client.post(
            "/upload/mask", files={"image": ("scene-mask.png", files[1])}, data={"original_ref": ref}
        )
        assert uploaded.json() == {"name": "scene-mask.png", "subfolder": "", "type": "input"}
        graph = img2img("scene-mask.png", "a green circle on a blue background", 1.0, steps=10)
        graph["11"] = {
            "class_type": "VAEEncodeForInpaint",
            "inputs": {"pixels": ["10", 0], "vae": ["4", 2], "mask": ["10", 1], "grow_mask_by": 0},
        }
        prompt_id = client.post("/prompt", json={"prompt": graph}).json()["prompt_id"]
        (saved,) = wait_history(client, prompt_id)["outputs"]["9"]["images"]
        result = np.asarray(
            PIL.Image.open(io.BytesIO(client.get("/view", params=saved).content)).convert("RGB")
        )
        job = client.get("/v1/jobs", params={"limit": 1}).json()["items"][0]
        assert (
            job["params"]["mask"].startswith("sha256:")
            and job["params"]["inpaint"]["fill"] == "latent_nothing"
        )
    before = np.asarray(scene.convert("RGB")).astype(int)
    kept = np.abs(result[:28, :28].astype(int) - before[:28, :28]).mean()
    red_before = (np.abs(before - dataset.COLORS["red"]).sum(-1) < 90)[:32, :32].sum()
    red_after = (np.abs(result.astype(int) - dataset.COLORS["red"]).sum(-1) < 90)[:32, :32].sum()
    assert kept < 6 and red_after > 0.8 * red_before > 150, (kept, red_before, red_after)


def test_invalid_graphs_get_comfyuis_400_with_node_errors(server: LiveServer) -> None:
    graph = txt2img(sampler="dpmpp_3m_sde")
    graph["5"]["inputs"].pop("width")
    with pytest.raises(ComfyApiError, match="400"):
        ComfyApiWrapper(server.url).queue_prompt(graph)
    with server.client() as client:
        before = job_count(client)
        response = client.post("/prompt", json={"prompt": graph})
        assert response.status_code == 400
        body = response.json()
        assert body["error"]["type"] == "prompt_outputs_failed_validation"
        assert body["node_errors"]["5"]["class_type"] == "EmptyLatentImage"
        assert body["node_errors"]["5"]["errors"][0]["extra_info"] == {"input_name": "width"}
        graph["5"]["inputs"]["width"] = 64
        body = client.post("/prompt", json={"prompt": graph}).json()
        assert list(body["node_errors"]) == ["3"]
        assert "dpmpp_3m_sde" in body["node_errors"]["3"]["errors"][0]["message"]
        mine = client.post("/v1/workflows/validate", json={"prompt": graph})
        assert mine.status_code == 422 and mine.json()["detail"][0]["loc"] == [
            "body",
            "prompt",
            "3",
            "sampler_name",
        ]
        too_many = txt2img(steps=5000)
        body = client.post("/prompt", json={"prompt": too_many}).json()
        assert body["node_errors"]["3"]["errors"][0]["extra_info"] == {"input_name": "steps"}
        assert job_count(client) == before


def test_object_info_lists_the_supported_nodes_with_this_servers_models(server: LiveServer) -> None:
    with server.client() as client:
        info = client.get("/object_info").json()
        assert "genserve-shapes" in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
        assert "euler_ancestral" in info["KSampler"]["input"]["required"]["sampler_name"][0]
        assert info["SaveImage"]["output_node"] is True and "LoadImageMask" not in info
        assert client.get("/object_info/KSampler").json()["KSampler"]["output"] == ["LATENT"]
        assert client.get("/queue").json() == {"queue_running": [], "queue_pending": []}


def test_the_workflows_tab_checks_runs_and_shows_the_outputs(server: LiveServer) -> None:
    """The web UI's Workflows tab (Debian's chromium through Playwright): an unmappable sampler is
    shown next to its node; the fixed workflow runs with each node's state and the saved picture."""
    sync_api = require_playwright()
    expect, sync_playwright = sync_api.expect, sync_api.sync_playwright
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on(
            "console", lambda m: m.type == "error" and not _is_http_error(m.text) and errors.append(m.text)
        )
        page.goto(server.url + "/#workflows")
        expect(page.locator("#workflows-page")).to_be_visible()
        page.fill("#workflow-json", json.dumps(txt2img(seed=31, steps=4, sampler="heun")))
        page.click("#workflow-form [data-action=check]")
        bad = page.locator('.workflow-node[data-node-id="3"] .node-message')
        expect(bad).to_contain_text("heun")
        expect(page.locator('.workflow-node[data-node-id="4"] .node-message')).to_be_hidden()
        page.fill("#workflow-json", json.dumps(txt2img(seed=31, steps=4)))
        page.click("#workflow-run")
        expect(page.locator("#workflow-images img")).to_have_count(1, timeout=60_000)
        expect(page.locator("#workflow-status")).to_have_text("Done.")
        expect(page.locator('.workflow-node[data-node-id="3"]')).to_have_attribute("data-state", "done")
        expect(page.locator('.workflow-node[data-node-id="9"]')).to_have_attribute("data-state", "done")
        size = page.locator("#workflow-images img").evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert size == [64, 64]
        # A clip (SaveWEBM) is shown as a video the browser can play, not as a broken picture.
        page.fill("#workflow-json", json.dumps(txt2video(length=8, steps=2, seed=32, save="SaveWEBM")))
        page.click("#workflow-run")
        clip = page.locator("#workflow-images video")
        expect(clip).to_have_count(1, timeout=60_000)
        page.wait_for_function("v => v.readyState >= 1 && v.videoWidth === 64", arg=clip.element_handle())
        browser.close()
    assert errors == []


def test_a_video_workflow_saves_an_animated_webp_of_the_asked_frames_and_size(server: LiveServer) -> None:
    """ComfyUI's Wan-style graph on the built-in genserve-shapes-motion: one video job, its steps
    on the websocket, the animated WebP listed as ComfyUI lists it and served by /view."""
    graph = txt2video("a red circle moving right on a blue background", length=16, size=64, steps=3, seed=5)
    prompt_id, messages, _ = run_on_socket(server, {"prompt": graph})
    progress = [m["data"] for m in messages if m["type"] == "progress"]
    assert progress and progress[-1] == {"value": 3, "max": 3, "node": "3", "prompt_id": prompt_id}
    with server.client() as client:
        done = wait_history(client, prompt_id)
        assert done["status"]["completed"], done["status"]
        (saved,) = done["outputs"]["9"]["images"]
        assert done["outputs"]["9"]["animated"] == [True] and saved["filename"].endswith(".webp")
        response = client.get("/view", params=saved)
        assert response.status_code == 200 and response.headers["content-type"] == "image/webp"
        clip = PIL.Image.open(io.BytesIO(response.content))
        assert (clip.format, clip.n_frames, clip.size) == ("WEBP", 16, (64, 64))
        # The video family's frame rule, reported on the KSampler: 400 on /prompt, 422 on validate.
        too_long = txt2video(length=40)
        body = client.post("/prompt", json={"prompt": too_long})
        assert body.status_code == 400
        (error,) = body.json()["node_errors"]["3"]["errors"]
        assert error["extra_info"] == {"input_name": "latent_image"} and "32 frames" in error["message"]
        mine = client.post("/v1/workflows/validate", json={"prompt": txt2video(checkpoint="genserve-shapes")})
        assert mine.status_code == 422
        assert mine.json()["detail"][0]["loc"] == ["body", "prompt", "3", "latent_image"]
        info = client.get("/object_info").json()
        assert {"EmptyHunyuanLatentVideo", "SaveAnimatedWEBP", "SaveWEBM", "SaveVideo"} <= set(info)


def test_a_video_workflow_saves_an_apng_and_an_mp4_of_the_clip(server: LiveServer) -> None:
    """SaveAnimatedPNG and CreateVideo + SaveVideo on one clip: each file has its frames and size."""
    import av

    graph = txt2video(length=8, steps=2, seed=6, save="SaveAnimatedPNG")
    graph["10"] = {"class_type": "CreateVideo", "inputs": {"images": ["8", 0], "fps": 12.0}}
    graph["11"] = {
        "class_type": "SaveVideo",
        "inputs": {"video": ["10", 0], "filename_prefix": "video/ComfyUI", "format": "auto", "codec": "auto"},
    }
    with server.client() as client:
        done = wait_history(client, client.post("/prompt", json={"prompt": graph}).json()["prompt_id"])
        assert done["status"]["completed"], done["status"]
        (apng,) = done["outputs"]["9"]["images"]
        (mp4,) = done["outputs"]["11"]["images"]
        assert done["outputs"]["11"]["animated"] == [True] and mp4["subfolder"] == "video"
        clip = PIL.Image.open(io.BytesIO(client.get("/view", params=apng).content))
        assert (clip.format, clip.n_frames, clip.size) == ("PNG", 8, (64, 64))
        data = client.get("/view", params=mp4)
        assert data.headers["content-type"] == "video/mp4"
        with av.open(io.BytesIO(data.content)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
            assert container.streams.video[0].average_rate == 12
        assert len(frames) == 8 and frames[0].shape == (64, 64, 3)
