"""The gateway as a real process (``lora-gateway serve``), called over real HTTP as a new user
would: the printed key, 18 photos, READY, the trigger word, 2 images at 3:4, downloads, credits.
Plus the admin CLI."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from gateway.cli import main
from tests.images import image_set, multipart_files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path):
    port = free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"),
        "providers": {"sandbox": {"training_seconds": 0.5, "queue_seconds": 0.1}},
        "engine": {"min_poll_interval_s": 0.1, "max_poll_interval_s": 0.5, "poll_interval_s": 0.1},
    }))
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    banner = []
    key = None
    deadline = time.monotonic() + 30
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        banner.append(line)
        m = re.search(r"(afk_[A-Za-z0-9_-]{32,})", line)
        if m and key is None:
            key = m.group(1)
        if "API docs" in line:
            break
    assert key, "".join(banner)
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    try:
        yield base, key, "".join(banner), cfg
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def poll(client: httpx.Client, path: str, done: set[str], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(path).json()
        if body["status"] in done or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def test_new_user_flow_against_a_running_server(server) -> None:
    base, key, banner, _ = server
    assert f'curl -s {base}/v2/me -H "X-API-Key: {key}"' in banner
    with httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=30) as client:
        start = client.get("/v2/me").json()["team"]["credits"]
        r = client.post(
            "/v2/loras",
            data={"name": "Grace", "subjectKind": "person", "gender": "female", "ethnicity": "irish", "age": "35"},
            files=multipart_files(image_set(18, size=(640, 480))),
        )
        assert r.status_code == 202, r.text
        assert r.headers["x-request-id"]
        lora = poll(client, f"/v2/loras/{r.json()['id']}", {"READY", "FAILED"})
        assert lora["status"] == "READY", lora
        assert re.fullmatch(r"[A-Z2-9]{5}", lora["triggerWord"])
        r = client.post("/v2/images/generate", json={
            "prompt": "walking on a beach at sunset", "model": "flux-lora",
            "fluxLoraParams": {"loraId": lora["id"], "num_outputs": 2, "aspect_ratio": "3:4"},
        })
        assert r.status_code == 202, r.text
        job = poll(client, f"/v2/jobs/{r.json()['jobId']}", {"COMPLETED", "FAILED"})
        assert job["status"] == "COMPLETED", job
        urls = job["result"]["images"]
        assert len(urls) == 2 and all(u.startswith(base + "/files/") for u in urls)
        for url in urls:
            got = httpx.get(url, timeout=10)  # no API key: the signed URL is the credential
            assert got.status_code == 200 and got.headers["content-type"] == "image/png"
            img = Image.open(io.BytesIO(got.content))
            assert (img.format, img.size) == ("PNG", (864, 1152))
        assert client.get("/v2/me").json()["team"]["credits"] == start - 2 - 255 - 4


def test_second_start_on_the_same_data_prints_no_new_key(server) -> None:
    base, key, _, cfg = server
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "teams", "list", "--config", str(cfg)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0 and "'default'" in out.stdout and "credits=10000" in out.stdout
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg), "--port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "API docs" in line:
                break
        banner = "".join(lines)
        assert "afk_" not in banner and "keys create" in banner
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_admin_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = ["--data-dir", str(tmp_path)]
    # an admin command never makes a database: it says where it looked and how to point it elsewhere
    assert main(["teams", "create", "acme", *d]) == 2
    err = capsys.readouterr().err
    assert f"no database at {tmp_path / 'gateway.sqlite3'}" in err and "--data-dir" in err and "LORA_GATEWAY_CONFIG" in err
    assert not (tmp_path / "gateway.sqlite3").exists()
    assert main(["migrate", *d]) == 0
    capsys.readouterr()
    assert main(["teams", "create", "acme", "--credits", "500", "--max-trainings", "3", *d]) == 0
    out = capsys.readouterr().out
    team_id = re.search(r"team ([0-9a-f-]{36})", out).group(1)
    first_key = re.search(r"once\): (afk_\S+)", out).group(1)
    assert "credits=500" in out and "no credits" not in out
    # teams by name (any case) or id
    assert main(["credits", "add", "ACME", "250", *d]) == 0
    assert "credits=750" in capsys.readouterr().out
    assert main(["teams", "set-limits", team_id, "--max-trainings", "7", "--rate-limit", "30", *d]) == 0
    assert "max_concurrent_trainings=7" in capsys.readouterr().out
    assert main(["keys", "create", "acme", "--name", "ci", *d]) == 0
    out = capsys.readouterr().out
    key_id = re.search(r"key ([0-9a-f-]{36})", out).group(1)
    second_key = re.search(r"once\): (afk_\S+)", out).group(1)
    assert second_key != first_key
    # keys by id, by prefix, or by the key itself
    assert main(["keys", "revoke", key_id, *d]) == 0
    assert "revoked key" in capsys.readouterr().out
    assert main(["keys", "revoke", key_id, *d]) == 1
    assert "revoked already" in capsys.readouterr().err
    assert main(["keys", "revoke", first_key, *d]) == 0
    out = capsys.readouterr().out
    assert "revoked key" in out and first_key not in out  # never echoed whole
    assert main(["keys", "list", "acme", *d]) == 0
    listing = capsys.readouterr().out
    assert listing.count("revoked") == 2
    assert first_key not in listing and second_key not in listing  # never shown again
    # keys are stored hashed: the database file holds neither key
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("gateway.sqlite3*"))
    assert first_key.encode() not in raw and second_key.encode() not in raw
    # not found: a message and a non-zero exit, everywhere
    assert main(["credits", "add", "00000000-0000-0000-0000-000000000000", "1", *d]) == 1
    assert main(["keys", "list", "nobody", *d]) == 1
    assert "no team with the id or name 'nobody'" in capsys.readouterr().err
    assert main(["keys", "create", "nobody", *d]) == 1
    assert main(["keys", "revoke", "afk_nope", *d]) == 1
    assert "no API key" in capsys.readouterr().err
    # a team without credits says so, and how to add some
    assert main(["teams", "create", "broke", *d]) == 0
    assert "credits add broke" in capsys.readouterr().out
    # two teams with one name: the id is asked for
    assert main(["teams", "create", "acme", *d]) == 0
    capsys.readouterr()
    assert main(["credits", "add", "acme", "1", *d]) == 1
    assert "2 teams are named 'acme'" in capsys.readouterr().err


def test_the_config_file_may_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\n")
    monkeypatch.setenv("LORA_GATEWAY_CONFIG", str(cfg))
    assert main(["teams", "list"]) == 2
    assert f"the config file {cfg}" in capsys.readouterr().err
    assert main(["migrate"]) == 0
    assert (tmp_path / "data" / "gateway.sqlite3").exists()
    assert main(["teams", "list"]) == 0


def test_bad_config_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server:\n  port: lots\n")
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "server.port" in out.stderr


def test_engine_runs_as_its_own_process(tmp_path: Path) -> None:
    """`serve` with run_workers: false answers requests; `lora-gateway worker` does the work."""
    port = free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"),
        "server": {"run_workers": False},
        "providers": {"sandbox": {"training_seconds": 0.3, "queue_seconds": 0}},
        "engine": {"min_poll_interval_s": 0.1, "max_poll_interval_s": 0.3, "poll_interval_s": 0.1},
    }))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    api = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    worker = None
    try:
        key = None
        assert api.stdout is not None
        for line in api.stdout:
            if key is None and line.strip().startswith("afk_"):
                key = line.strip()
            if "API docs" in line:
                break
        assert key, "no key printed"
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"{base}/readyz", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert ready.status_code == 503 and ready.json()["checks"]["workers"] == "none running"
        with httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=30) as client:
            r = client.post("/v2/loras", data={"name": "W", "subjectKind": "object"}, files=multipart_files(image_set(15)))
            assert r.status_code == 202, r.text
            time.sleep(0.5)
            assert client.get(f"/v2/loras/{r.json()['id']}").json()["status"] == "PENDING"  # nobody works on it
            worker = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "worker", "--config", str(cfg)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            )
            lora = poll(client, f"/v2/loras/{r.json()['id']}", {"READY", "FAILED"})
            assert lora["status"] == "READY", lora
            ready = httpx.get(f"{base}/readyz", timeout=5)
            assert ready.status_code == 200 and ready.json()["checks"]["workers"] == "external (1 running)"
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=15) == 0  # a clean stop on SIGTERM
    finally:
        for proc in (api, worker):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
