"""Batch rendering: specs, located errors, retries, resume after SIGKILL, de-duplication, the server API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import yaml
from PIL import Image

from genserve.batch.expand import expand, variant_rows
from genserve.batch.spec import SpecError, load_spec
from genserve.config import Settings
from genserve.engine.models.registry import scan_models
from tests.helpers import LiveServer, parse_sse


def settings_for(tiny_models_dir: Path, data_dir: Path, **overrides) -> Settings:
    return Settings(
        models_dir=tiny_models_dir,
        data_dir=data_dir,
        default_model="tiny-sd15",
        torch_threads=1,
        retry_backoff_seconds=0.05,
        heartbeat_seconds=0.5,
        **overrides,
    )


def write_spec(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


# 1. Specs


def test_template_grid_zip_and_n_expand_to_unique_items(tiny_models_dir, tmp_path):
    spec, base = load_spec(
        {
            "prompts": {
                "template": "a {color} {shape}",
                "values": {"color": ["red", "blue"], "shape": ["star"]},
            },
            "variants": {"seed": [1, 2], "steps": [3, 4], "n": 2},
        }
    )
    items = expand(spec, base, scan_models(tiny_models_dir), settings_for(tiny_models_dir, tmp_path))
    # prompts × grid(seed, steps) × n = 16, but n=2 from seeds 1 and 2 gives seeds (1, 2) and (2, 3):
    # the repeated seed 2 is the same picture, rendered once. 2 prompts × 2 steps × seeds {1, 2, 3}.
    assert len(items) == 12
    assert len({item.key for item in items}) == len(items)
    assert sorted({item.params.seed for item in items}) == [1, 2, 3]
    zipped, _ = load_spec({"prompts": ["x"], "variants": {"mode": "zip", "seed": [1, 2, 3], "steps": [5]}})
    assert [(row["seed"], row["steps"]) for row in variant_rows(zipped)] == [(1, 5), (2, 5), (3, 5)]


def test_prompt_files_text_and_jsonl(tiny_models_dir, tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\na blue star\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a green square", "negative_prompt": "blur"}\n')
    models, settings = scan_models(tiny_models_dir), settings_for(tiny_models_dir, tmp_path)
    text, base = load_spec({"prompts": {"file": "p.txt"}}, base_dir=tmp_path)
    assert [i.params.prompt for i in expand(text, base, models, settings)] == ["a red circle", "a blue star"]
    lines, base = load_spec({"prompts": {"file": "p.jsonl"}}, base_dir=tmp_path)
    [item] = expand(lines, base, models, settings)
    assert item.params.negative_prompt == "blur"


@pytest.mark.parametrize(
    ("spec", "located"),
    [
        ({"variants": {"seed": [1]}}, "prompts: Field required"),
        ({"prompts": ["ok", 3]}, "prompts[1]:"),
        (
            {"prompts": ["ok"], "variants": {"size": ["64x64", "big"]}},
            "variants.size: size[1]: expected WIDTHxHEIGHT",
        ),
        ({"prompts": ["ok"], "variants": {"sampler": ["euler", "plms"]}}, "variants.sampler[1]:"),
        ({"prompts": ["ok"], "surprise": 1}, "surprise: Extra inputs are not permitted"),
        (
            {"prompts": {"template": "a {color}", "values": {"shape": ["x"]}}},
            "prompts.values: no values for placeholder(s) color",
        ),
        (
            {"prompts": ["ok"], "variants": {"mode": "zip", "seed": [1, 2], "steps": [1, 2, 3]}},
            "variants: zip needs",
        ),
        (
            {"prompts": ["ok", "fine"], "variants": {"size": ["64x64", "4096x64"]}},
            "prompts[0] × variants[1] (n=0).width",
        ),
        ({"prompts": ["ok"], "variants": {"steps": [10, 500]}}, "prompts[0] × variants[1] (n=0).steps"),
        ({"prompts": ["ok"], "variants": {"model": ["nope"]}}, "prompts[0] × variants[0] (n=0).model"),
    ],
)
def test_invalid_specs_report_every_error_with_its_location(tiny_models_dir, tmp_path, spec, located):
    with pytest.raises(SpecError) as caught:
        parsed, base = load_spec(spec)
        expand(parsed, base, scan_models(tiny_models_dir), settings_for(tiny_models_dir, tmp_path))
    assert any(located in line for line in caught.value.errors), caught.value.errors


def test_cli_validate_prints_located_errors(tiny_models_dir, tmp_path):
    spec = write_spec(tmp_path / "bad.yaml", prompts=["ok"], variants={"size": ["64x64", "4096x64"]})
    env = {**os.environ, "GENSERVE_MODELS_DIR": str(tiny_models_dir), "GENSERVE_DEFAULT_MODEL": "tiny-sd15"}
    result = subprocess.run(
        [sys.executable, "-m", "genserve.cli", "batch", "validate", str(spec)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "variants[1]" in result.stderr and "width" in result.stderr


# 2. Running locally


def test_fifty_items_with_an_injected_fault_complete_with_a_full_manifest(
    tiny_models_dir, tmp_path, monkeypatch
):
    from genserve.batch.cli import run_local
    from genserve.engine.engine import Engine, EngineError

    real = Engine.generate_batch
    faults = {"left": 2}  # the faulty item's batch fails, then its solo retry in the same claim fails too

    def flaky(self, items, on_batch_step=None):
        if faults["left"] and any((item.params.prompt, item.params.seed) == ("item 7", 1) for item in items):
            faults["left"] -= 1
            raise EngineError("injected fault")
        return real(self, items, on_batch_step)

    monkeypatch.setattr(Engine, "generate_batch", flaky)
    spec, base = load_spec(
        {"prompts": [f"item {i}" for i in range(25)], "variants": {"seed": [1, 2], "steps": [2]}}
    )
    settings = settings_for(tiny_models_dir, tmp_path / "data")
    models = scan_models(tiny_models_dir)
    items = expand(spec, base, models, settings)
    assert len(items) == 50
    summary = run_local(spec, items, models, settings, tmp_path / "out")
    assert summary["succeeded"] == 50 and summary["failed"] == 0 and faults["left"] == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 50 and all(row["state"] == "succeeded" and row["sha256"] for row in rows)
    attempts = {(row["prompt"], row["seed"]): row["attempts"] for row in rows}
    assert attempts.pop(("item 7", 1)) == 2  # failed once, retried after its backoff, succeeded
    assert set(attempts.values()) == {1}
    assert all((tmp_path / "out" / row["file"]).is_file() for row in rows)
    csv_lines = (tmp_path / "out" / "manifest.csv").read_text().splitlines()
    assert len(csv_lines) == 51 and csv_lines[0].startswith("index,key,state,prompt")


def test_two_specs_sharing_items_render_them_once(tiny_models_dir, tmp_path):
    from genserve.batch.cli import run_local
    from genserve.store.jobs import JobStore

    settings = settings_for(tiny_models_dir, tmp_path / "data")
    models = scan_models(tiny_models_dir)
    manifests = []
    for name, prompts in (("a", ["p1", "p2"]), ("b", ["p2", "p3"])):
        spec, base = load_spec({"name": name, "prompts": prompts, "variants": {"seed": [5], "steps": [2]}})
        run_local(spec, expand(spec, base, models, settings), models, settings, tmp_path / name)
        manifests.append(
            {row["prompt"]: row for row in map(json.loads, (tmp_path / name / "manifest.jsonl").open())}
        )
    assert manifests[0]["p2"]["job_id"] == manifests[1]["p2"]["job_id"]
    store = JobStore.from_url(settings.resolved_store_url)
    assert store.counts_by_state()["succeeded"] == 3
    shared = manifests[0]["p2"]["job_id"]
    assert [e.type for e in store.events.read_after(shared)].count("started") == 1


def test_killed_batch_resumes_without_rendering_any_item_twice(tiny_models_dir, tmp_path):
    spec = write_spec(
        tmp_path / "spec.yaml",
        name="resume",
        prompts=[f"shape {i}" for i in range(8)],
        variants={"seed": [3, 4], "steps": [8]},
        output={"dir": "out", "pattern": "{index:03d}.{ext}"},
    )
    env = {
        **os.environ,
        "GENSERVE_MODELS_DIR": str(tiny_models_dir),
        "GENSERVE_DEFAULT_MODEL": "tiny-sd15",
        "GENSERVE_DATA_DIR": str(tmp_path / "data"),
        "GENSERVE_TORCH_THREADS": "1",
        "GENSERVE_DEFAULT_MAX_BATCH_IMAGES": "4",
    }
    command = [sys.executable, "-m", "genserve.cli", "batch", "run", str(spec)]
    db = sa.create_engine(f"sqlite:///{tmp_path / 'data' / 'genserve.db'}")

    def succeeded() -> int:
        try:
            with db.connect() as conn:
                return conn.execute(sa.text("select count(*) from jobs where state='succeeded'")).scalar()
        except sa.exc.OperationalError:
            return 0

    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while succeeded() < 4:
        assert time.monotonic() < deadline and first.poll() is None, "the first run made no progress"
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = succeeded()
    assert 4 <= done_before < 16

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    with db.connect() as conn:
        per_job = conn.execute(
            sa.text("select job_id, count(*) from job_events where type='succeeded' group by job_id")
        ).all()
    assert len(per_job) == 16 and {count for _, count in per_job} == {1}  # each item finished exactly once
    rows = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").open()]
    assert len(rows) == 16 and all(row["state"] == "succeeded" for row in rows)

    # The same spec, uninterrupted, in a fresh store: the same pictures (batching may round one level).
    clean_env = {**env, "GENSERVE_DATA_DIR": str(tmp_path / "clean-data")}
    clean = subprocess.run(
        [*command, "--out", str(tmp_path / "clean")], env=clean_env, capture_output=True, text=True
    )
    assert clean.returncode == 0, clean.stderr
    for row in rows:
        resumed_pixels = np.asarray(Image.open(tmp_path / "out" / row["file"]), dtype=int)
        clean_pixels = np.asarray(Image.open(tmp_path / "clean" / row["file"]), dtype=int)
        assert np.abs(resumed_pixels - clean_pixels).max() <= 1


# 3. On the server


def test_server_batches_progress_manifest_and_cancel(tiny_models_dir, tmp_path):
    server = LiveServer(tiny_models_dir, tmp_path).start()
    try:
        with server.client() as client:
            spec = {
                "name": "catalog",
                "prompts": {"template": "a {c} star", "values": {"c": ["red", "blue", "green"]}},
                "variants": {"seed": [1, 2], "steps": [3]},
            }
            batch = client.post("/v1/batches", json=spec)
            assert batch.status_code == 202, batch.text
            batch = batch.json()
            assert batch["counts"]["total"] == 6
            with client.stream("GET", batch["events_url"], timeout=120) as response:
                events = list(parse_sse(response.iter_lines()))
            assert events[-1].type == "completed" and events[-1].data["succeeded"] == 6
            assert client.get(f"/v1/batches/{batch['id']}").json()["done"] is True
            rows = [json.loads(line) for line in client.get(batch["manifest_url"]).text.splitlines()]
            assert len(rows) == 6 and all(row["file"].startswith("/v1/images/") for row in rows)
            assert client.get(rows[0]["file"]).status_code == 200
            csv_text = client.get(batch["manifest_url"], params={"format": "csv"}).text
            assert csv_text.startswith("index,key,state")
            # The same spec again shares every item: nothing new to render.
            again = client.post("/v1/batches", json=spec).json()
            assert again["counts"]["succeeded"] == 6

            long = client.post(
                "/v1/batches",
                json={
                    "prompts": [f"long {i}" for i in range(6)],
                    "variants": {"steps": [60], "size": ["96x96"]},
                },
            ).json()
            canceled = client.delete(f"/v1/batches/{long['id']}").json()
            assert canceled["counts"]["canceled"] + canceled["counts"]["running"] == 6
            jobs = client.get("/v1/jobs", params={"limit": 6}).json()["items"]
            assert all(job["queue"] == "long" for job in jobs)

            bad = client.post("/v1/batches", json={"prompts": ["x"], "variants": {"size": ["4096x64"]}})
            assert bad.status_code == 422 and "variants[0]" in bad.json()["detail"][0]["msg"]
    finally:
        server.stop()


# 5. Pictures in (issue 16): init_image per prompt item, strength variants


def red_png(path: Path, size=(64, 48)) -> bytes:
    Image.new("RGB", size, (220, 20, 20)).save(path)
    return path.read_bytes()


def test_init_image_per_prompt_item_and_strength_variants(tiny_models_dir, tmp_path):
    import hashlib

    from genserve.artifacts.inputs import InputStore
    from genserve.batch.expand import store_spec_pictures
    from genserve.batch.runner import cost_group

    data = red_png(tmp_path / "red.png")
    settings = settings_for(tiny_models_dir, tmp_path / "data")
    pictures = InputStore(settings.inputs_dir)
    models = scan_models(tiny_models_dir)
    body = {
        "prompts": [{"prompt": "a green circle", "init_image": "red.png"}, "a blue star"],
        "variants": {"strength": [0.5, 0.75], "steps": [4]},
    }
    spec, base = load_spec(body, base_dir=tmp_path)
    stored = store_spec_pictures(spec, base, pictures, settings.limits, local_files=True)
    items = expand(stored, base, models, settings, pictures)
    picture_id = "sha256:" + hashlib.sha256(data).hexdigest()
    from_picture = [item for item in items if item.params.init_image]
    assert [(i.params.init_image, i.params.strength) for i in from_picture] == [
        (picture_id, 0.5),
        (picture_id, 0.75),
    ]
    assert all((i.params.width, i.params.height) == (64, 48) for i in from_picture)  # the picture's size
    assert pictures.get(picture_id) == data
    assert len({cost_group(i.params) for i in from_picture}) == 2  # different strengths cost differently
    # The txt2img prompt is one item, keyed exactly as before strength variants existed.
    [plain] = [item for item in items if not item.params.init_image]
    plain_spec, _ = load_spec({"prompts": ["a blue star"], "variants": {"steps": [4]}}, base_dir=tmp_path)
    assert plain.key == expand(plain_spec, base, models, settings)[0].key
    assert len({item.key for item in items}) == 3


def test_bad_pictures_in_a_spec_are_located(tiny_models_dir, tmp_path):
    from genserve.artifacts.inputs import InputStore
    from genserve.batch.expand import store_spec_pictures

    settings = settings_for(tiny_models_dir, tmp_path / "data")
    pictures = InputStore(settings.inputs_dir)
    red_png(tmp_path / "red.png")
    (tmp_path / "notes.txt").write_text("not a picture")
    spec, base = load_spec(
        {
            "prompts": [
                {"prompt": "a", "init_image": "missing.png"},
                {"prompt": "b", "init_image": "notes.txt"},
                {"prompt": "c", "init_image": "red.png", "mask": "sha256:" + "0" * 64},
            ]
        },
        base_dir=tmp_path,
    )
    with pytest.raises(SpecError) as caught:
        store_spec_pictures(spec, base, pictures, settings.limits, local_files=True)
    assert caught.value.errors[0].startswith("prompts[0].init_image: cannot read missing.png")
    assert caught.value.errors[1].startswith("prompts[1].init_image: init_image: not a PNG, JPEG or WebP")
    assert caught.value.errors[2].startswith("prompts[2].mask: mask: no upload has the id")
    # A spec sent to the server never names files on it.
    with pytest.raises(SpecError) as caught:
        store_spec_pictures(spec, base, pictures, settings.limits, local_files=False)
    assert "not base64, a data URL or an upload id" in caught.value.errors[0]
    with pytest.raises(SpecError) as caught:  # an empty template prompt is located, not a crash
        expand(
            load_spec({"prompts": {"template": "", "values": {}}})[0],
            base,
            scan_models(tiny_models_dir),
            settings,
        )
    assert caught.value.errors[0].startswith("prompts[0] × variants[0] (n=0): prompt")
    with pytest.raises(SpecError) as caught:
        load_spec({"prompts": ["x"], "variants": {"strength": [0.5, 1.5]}})
    assert "variants.strength: strength[1] = 1.5 is outside (0, 1]" in caught.value.errors[0]


def test_server_batch_stores_pictures_by_hash(tiny_models_dir, tmp_path):
    import base64
    import hashlib

    from fastapi.testclient import TestClient

    from genserve.api.app import create_app
    from genserve.store.batches import BatchStore

    data = red_png(tmp_path / "red.png")
    settings = settings_for(tiny_models_dir, tmp_path / "data", workers=0, builtin_models=False)
    app = create_app(settings, supervise_workers=False)
    with TestClient(app) as client:
        spec = {
            "prompts": [{"prompt": "a green circle", "init_image": base64.b64encode(data).decode()}],
            "variants": {"strength": [0.5, 1.0], "steps": [4]},
        }
        batch = client.post("/v1/batches", json=spec)
        assert batch.status_code == 202, batch.text
        rows = [json.loads(line) for line in client.get(batch.json()["manifest_url"]).text.splitlines()]
        picture_id = "sha256:" + hashlib.sha256(data).hexdigest()
        assert [(row["init_image"], row["strength"]) for row in rows] == [
            (picture_id, 0.5),
            (picture_id, 1.0),
        ]
        stored = BatchStore(app.state.services.store.engine).get(batch.json()["id"]).spec
        assert stored["prompts"][0]["init_image"] == picture_id  # not the base64
        bad = client.post("/v1/batches", json={"prompts": [{"prompt": "x", "init_image": "red.png"}]})
        assert bad.status_code == 422 and "prompts[0].init_image" in bad.json()["detail"][0]["msg"]
