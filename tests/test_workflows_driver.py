"""The workflow driver in the API process, with the store's real databases and a stand-in worker
(no model runs: the worker below completes claimed jobs with a plain picture). A prompt left
unfinished by a stopped server finishes after a restart without submitting its job twice;
/interrupt cancels a prompt's jobs and a re-run samples again."""

from __future__ import annotations

import io
import json
import time

import PIL.Image
import pytest
from fastapi.testclient import TestClient

from genserve.artifacts.images import ImageStore, image_id_for
from genserve.config import Settings
from genserve.schemas import JobState
from genserve.store.jobs import JobStore
from tests.workflow_graphs import txt2img, with_scale


@pytest.fixture
def settings(tmp_path, store_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        models_dir=tmp_path / "models",
        store_url=store_url,
        default_model="genserve-shapes",
        builtin_models=True,
        workers=0,
    )


def serve(settings: Settings) -> TestClient:
    from genserve.api.app import create_app

    return TestClient(create_app(settings, supervise_workers=False))


def work_queued(settings: Settings) -> list[str]:
    """A stand-in worker: claim the queued jobs and finish each with a grey picture of its size."""
    store = JobStore.from_url(settings.resolved_store_url)
    images = ImageStore(settings.data_dir / "images")
    try:
        queued = store.queued_jobs()
        claimed = store.claim_jobs([job.id for job in queued], "stand-in", 60)
        for job in claimed:
            ids = [image_id_for(job.id, i) for i in range(job.params["num_images"])]
            for image_id in ids:
                buffer = io.BytesIO()
                PIL.Image.new("RGB", (job.params["width"], job.params["height"]), "gray").save(buffer, "PNG")
                images.save(image_id, buffer.getvalue())
            store.complete(job.id, "stand-in", job.attempt, ids)
        return [job.id for job in claimed]
    finally:
        store.close()


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise TimeoutError


def jobs(client: TestClient) -> list[dict]:
    return client.get("/v1/jobs", params={"limit": 50}).json()["items"]


def test_an_unfinished_prompt_resumes_after_a_restart_from_its_cached_stages(settings: Settings) -> None:
    graph = with_scale(txt2img(seed=5), 40, 24)
    with serve(settings) as client:
        prompt_id = client.post("/prompt", json={"prompt": graph}).json()["prompt_id"]
        (job,) = wait_for(lambda: jobs(client))
        assert job["request_id"].startswith("wf:") and job["state"] == "queued"
        assert client.get("/queue").json()["queue_pending"][0][1] == prompt_id
    # The server stopped with the prompt unfinished; its job runs while nothing drives it.
    assert work_queued(settings) == [job["id"]]
    with serve(settings) as client:
        done = wait_for(lambda: client.get(f"/history/{prompt_id}").json())[prompt_id]
        assert done["status"]["completed"]
        assert [j["id"] for j in jobs(client)] == [job["id"]]  # found again, not submitted twice
        (saved,) = done["outputs"]["9"]["images"]
        picture = PIL.Image.open(io.BytesIO(client.get("/view", params=saved).content))
        assert picture.size == (40, 24)
        assert client.get("/queue").json() == {"queue_running": [], "queue_pending": []}


def test_interrupt_cancels_the_prompt_and_a_rerun_samples_again(settings: Settings) -> None:
    with serve(settings) as client:
        prompt_id = client.post("/prompt", json={"prompt": txt2img(seed=9)}).json()["prompt_id"]
        (job,) = wait_for(lambda: jobs(client))
        assert client.post("/interrupt").status_code == 200
        ended = wait_for(lambda: client.get(f"/history/{prompt_id}").json())[prompt_id]
        assert ended["status"]["status_str"] == "error"
        assert ended["status"]["messages"][-1][0] == "execution_interrupted"
        assert client.get(f"/v1/jobs/{job['id']}").json()["state"] == JobState.canceled
        # The canceled job is no cache hit: the same graph makes a new job, which can finish.
        again = client.post("/prompt", json={"prompt": txt2img(seed=9)}).json()["prompt_id"]
        wait_for(lambda: len(jobs(client)) == 2)
        work_queued(settings)
        assert wait_for(lambda: client.get(f"/history/{again}").json())[again]["status"]["completed"]
        assert {j["request_id"] for j in jobs(client)} == {job["request_id"], job["request_id"] + ".1"}
        # ComfyUI's other spellings: the /api prefix, GET /prompt, forgetting history.
        assert client.get("/api/prompt").json() == {"exec_info": {"queue_remaining": 0}}
        assert set(client.get("/api/history").json()) == {prompt_id, again}
        assert client.post("/history", content=json.dumps({"delete": [prompt_id]})).json() == {
            "deleted": [prompt_id]
        }
        assert client.get(f"/history/{prompt_id}").json() == {}
        assert set(client.get("/history").json()) == {again}


def test_with_auth_on_prompts_uploads_and_the_websocket_need_a_key(tmp_path) -> None:
    from starlette.websockets import WebSocketDisconnect

    from genserve.auth.keys import KeyStore

    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=tmp_path / "models",
        store_url=f"sqlite:///{tmp_path / 'store.db'}",
        default_model="genserve-shapes",
        workers=0,
        auth="on",
    )
    with serve(settings) as client:
        _, token = KeyStore.from_url(settings.resolved_store_url).create("script")
        _, other = KeyStore.from_url(settings.resolved_store_url).create("someone else")
        assert client.post("/prompt", json={"prompt": txt2img()}).status_code == 401
        assert client.get("/object_info").status_code == 401
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/ws?clientId=a"):
            pass
        assert refused.value.code == 1008
        # comfy-api-simplified's user/password: HTTP Basic with the key as the password.
        queued = client.post("/prompt", json={"prompt": txt2img(), "client_id": "a"}, auth=("user", token))
        assert queued.status_code == 200
        prompt_id = queued.json()["prompt_id"]
        with client.websocket_connect("/ws?clientId=a", headers={"Authorization": f"Bearer {token}"}) as ws:
            assert ws.receive_json()["type"] == "status"
        mine = client.get("/queue", auth=("user", token)).json()
        theirs = client.get("/queue", auth=("user", other)).json()
        assert [item[1] for item in mine["queue_pending"] + mine["queue_running"]] == [prompt_id]
        assert theirs == {"queue_running": [], "queue_pending": []}


def test_bodies_without_a_content_type_get_the_input_guards_checks(settings: Settings) -> None:
    """ComfyUI clients post JSON with no Content-Type; NaN, deep nesting and non-objects are 422s."""
    with serve(settings) as client:
        nan = '{"prompt": {"3": {"class_type": "KSampler", "inputs": {"denoise": NaN}}}}'
        refused = client.post("/prompt", content=nan)
        assert refused.status_code == 422
        assert refused.json()["detail"][0]["loc"] == ["body", "prompt.3.inputs.denoise"]
        deep = client.post("/prompt", content='{"prompt": ' + "[" * 200 + "]" * 200 + "}")
        assert deep.status_code == 422
        assert client.post("/prompt", content="[1, 2]").status_code == 422
        assert client.post("/prompt", content="{not json").status_code == 422
        assert client.post("/prompt", content='{"prompt": {}}').json()["error"]["type"] == "invalid_prompt"


def test_the_sdxl_base_and_refiner_template_passes_genserves_checks(tiny_models_dir, tmp_path) -> None:
    """The SDXL template becomes one job with genserve's refiner, which resolve_params accepts for
    a tiny SDXL base and refiner; a refiner behind an SD1.5 model is refused on its node."""
    from genserve.engine.models.fixtures import write_tiny_refiner
    from tests.test_workflows import sdxl_base_and_refiner

    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny-sdxl").symlink_to(tiny_models_dir / "tiny-sdxl")
    (models / "tiny-sd15").symlink_to(tiny_models_dir / "tiny-sd15")
    write_tiny_refiner(models / "tiny-refiner")
    settings = Settings(
        data_dir=tmp_path / "data", models_dir=models, store_url=f"sqlite:///{tmp_path / 'store.db'}",
        default_model="tiny-sdxl", workers=0, builtin_models=False,
    )  # fmt: skip
    graph = sdxl_base_and_refiner(end=4, steps=5)
    graph["4"]["inputs"]["ckpt_name"] = "tiny-sdxl.safetensors"
    graph["20"]["inputs"]["ckpt_name"] = "tiny-refiner.safetensors"
    with serve(settings) as client:
        checked = client.post("/v1/workflows/validate", json={"prompt": graph})
        assert checked.status_code == 200, checked.text
        (stage,) = checked.json()["stages"]
        assert stage["params"]["refiner"] == {"model": "tiny-refiner", "switch_at": 0.8}
        graph["4"]["inputs"]["ckpt_name"] = "tiny-sd15"
        refused = client.post("/v1/workflows/validate", json={"prompt": graph})
        assert refused.status_code == 422
        assert refused.json()["detail"][0]["loc"] == ["body", "prompt", "23", "model"]
        assert "SDXL base" in refused.json()["detail"][0]["msg"]
