"""LoRAs through the API (issue 18): GET /v1/loras, A1111's /sdapi/v1/loras through webuiapi,
422s naming loras[i].name, `<lora:name:weight>` tags in prompts, and per-key allowed LoRAs."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import webuiapi

from tests.helpers import LiveServer, keys_cli, wait_job
from tests.test_lora import write_diffusers_lora, write_loha, write_sdxl_lora

FAST = {"steps": 2, "width": 64, "height": 64, "seed": 1}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def admin_token(data_dir: Path) -> str:
    created = keys_cli(data_dir, "create", "ops", "--role", "admin")
    assert created.exit_code == 0, created.output
    return created.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def server(tiny_models_dir: Path, data_dir: Path, admin_token: str, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lora-api-models")
    (root / "tiny-sd15").symlink_to(tiny_models_dir / "tiny-sd15")
    write_diffusers_lora(tiny_models_dir / "tiny-sd15", root / "lora" / "style-a.safetensors", seed=1)
    write_diffusers_lora(tiny_models_dir / "tiny-sd15", root / "lora" / "style-b.safetensors", seed=2)
    write_loha(root / "lora" / "loha-d.safetensors")
    write_sdxl_lora(root / "lora" / "xl-e.safetensors")
    live = LiveServer(models_dir=root, data_dir=data_dir, env={"GENSERVE_AUTH": "on"}).start(wait_ready=False)
    yield live
    live.kill_all()


def client_for(server: LiveServer, token: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture(scope="module")
def admin(server: LiveServer, admin_token: str):
    with client_for(server, admin_token) as client:
        yield client


def new_key(admin: httpx.Client, **limits: object) -> str:
    response = admin.post("/v1/admin/keys", json={"name": "k", "rate_per_second": 1000, **limits})
    assert response.status_code == 201, response.text
    return response.json()["token"]


def test_v1_loras_lists_them_with_family_and_format(admin: httpx.Client) -> None:
    data = admin.get("/v1/loras").json()["data"]
    assert {d["name"]: (d["family"], d["format"], d["supported"]) for d in data} == {
        "style-a": ("sd15", "diffusers", True),
        "style-b": ("sd15", "diffusers", True),
        "loha-d": ("sd15", "loha", False),
        "xl-e": ("sdxl", "kohya", True),
    }


def test_webuiapi_lists_the_loras(server: LiveServer, admin_token: str) -> None:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    api.session.headers["Authorization"] = f"Bearer {admin_token}"
    loras = api.get_loras()
    assert [lora["name"] for lora in loras] == ["loha-d", "style-a", "style-b", "xl-e"]
    assert loras[1]["path"] == "style-a.safetensors" and loras[1]["metadata"]["family"] == "sd15"


@pytest.mark.parametrize(
    ("loras", "field", "message"),
    [
        ([{"name": "xl-e"}], "loras[0].name", "is for sdxl models; model 'tiny-sd15' is sd15"),
        ([{"name": "style-a"}, {"name": "loha-d"}], "loras[1].name", "LyCORIS LoHa"),
        ([{"name": "nope"}], "loras[0].name", "is not registered"),
    ],
)
def test_loras_that_cannot_apply_get_a_422_naming_the_field(
    admin: httpx.Client, loras: list, field: str, message: str
) -> None:
    response = admin.post("/v1/jobs", json={"prompt": "x", "loras": loras, **FAST})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert field in str(detail["loc"]) and message in detail["msg"]


def test_a_prompt_tag_becomes_a_lora_and_the_job_runs(server: LiveServer, admin: httpx.Client) -> None:
    with client_for(server, new_key(admin)) as client:  # a key without the admin's request rate
        response = client.post("/v1/jobs", json={"prompt": "a red circle <lora:style-a:0.8>", **FAST})
        assert response.status_code == 202, response.text
        job = wait_job(client, response.json()["id"])
    assert job["state"] == "succeeded", job
    assert job["params"]["prompt"] == "a red circle"
    assert job["params"]["loras"] == [{"name": "style-a", "weight": 0.8}]


def test_a_key_may_be_limited_to_some_loras(server: LiveServer, admin: httpx.Client) -> None:
    token = new_key(admin, allowed_loras=["style-a"])
    with client_for(server, token) as client:
        assert [d["name"] for d in client.get("/v1/loras").json()["data"]] == ["style-a"]
        assert [d["name"] for d in client.get("/sdapi/v1/loras").json()] == ["style-a"]
        response = client.post("/v1/jobs", json={"prompt": "x <lora:style-b>", **FAST})
        assert response.status_code == 422
        detail = response.json()["detail"][0]
        assert "loras[0].name" in str(detail["loc"]) and "only the LoRAs ['style-a']" in detail["msg"]
        assert client.post("/v1/jobs", json={"prompt": "x <lora:style-a>", **FAST}).status_code == 202


def test_the_keys_cli_takes_allowed_loras(data_dir: Path) -> None:
    created = keys_cli(data_dir, "create", "limited", "--lora", "style-a", "--lora", "style-b")
    assert created.exit_code == 0, created.output
