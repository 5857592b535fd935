"""`medgem serve` as a real process: its logs (at DEBUG) hold no prompt text, image data or DICOM
identifier; SIGTERM drains it (the stream in flight finishes with [DONE], new API calls get 503, then
it exits 0); and a non-loopback bind without keys warns."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pydicom

from medgem.serve.app import warn_if_exposed
from medgem.serve.settings import ServeSettings

SECRET = "Mrs PATIENT-SMITH-1234 reports chest pain"
MEDGEM = [sys.executable, "-c", "import sys; from medgem.cli import main; sys.exit(main())"]


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited during start-up"
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server never became ready")


def test_logs_hold_no_prompt_image_or_identifier_and_sigterm_drains(tiny_medgemma, tmp_path, chest_dicom, data_url,
                                                                    free_port):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    env = {**os.environ, "MEDGEM_LOG_LEVEL": "DEBUG"}
    args = ["serve", "--model", str(tiny_medgemma), "--model-name", "tiny", "--port", str(port),
            "--max-batch", "1", "--max-tokens", "150", "--max-prompt-tokens", "64", "--drain-seconds", "60"]
    with log_path.open("w") as log:
        proc = subprocess.Popen([*MEDGEM, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(url, proc)
        dicom = data_url(chest_dicom, "application/dicom")
        ask = {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": dicom}}, {"type": "text", "text": SECRET}]}]}
        assert httpx.post(f"{url}/v1/chat/completions", json=ask, timeout=60).status_code == 200
        assert httpx.post(f"{url}/v1/chat/completions", json={**ask, "max_tokens": SECRET}).status_code == 422
        assert httpx.post(f"{url}/v1/chat/completions", json={**ask, "model": SECRET}).status_code == 404
        preview = httpx.post(f"{url}/v1/dicom/preview", content=Path(chest_dicom).read_bytes(), timeout=60)
        assert preview.status_code == 200

        lines: list[str] = []

        def stream() -> None:
            body = {"model": "tiny", "prompt": "Findings:", "max_tokens": 150, "temperature": 1.0, "seed": 3,
                    "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as reply:
                lines.extend(line for line in reply.iter_lines() if line)

        reader = threading.Thread(target=stream)
        reader.start()
        deadline = time.monotonic() + 60
        while not lines and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        while httpx.get(f"{url}/ready", timeout=5).status_code == 200:
            time.sleep(0.02)
        refused = httpx.get(f"{url}/v1/models", timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert refused.headers["x-medgem-notice"] and refused.headers["retry-after"]
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        reader.join(timeout=120)
        assert lines[-1] == "data: [DONE]" and '"finish_reason":"length"' in lines[-2].replace(" ", "")
        assert not any('"error"' in line for line in lines)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert "medgem.access: POST /v1/chat/completions 200" in log and "draining" in log  # logging was on
    header = pydicom.dcmread(chest_dicom, stop_before_pixels=True)
    payload = base64.b64encode(Path(chest_dicom).read_bytes()).decode()
    for secret in (SECRET, "PATIENT-SMITH", str(header.PatientName), header.PatientID, header.PatientBirthDate,
                   header.InstitutionName, payload[200:260]):
        assert secret not in log, f"the log leaks {secret[:20]!r}"


def test_non_loopback_bind_without_keys_warns(capsys):
    warn_if_exposed(ServeSettings(host="0.0.0.0"))
    assert "medgem: warning: binding 0.0.0.0 without API keys" in capsys.readouterr().err
    for quiet in (ServeSettings(host="0.0.0.0", api_keys=("k",)), ServeSettings(host="::1"),
                  ServeSettings(host="localhost")):
        warn_if_exposed(quiet)
        assert "warning" not in capsys.readouterr().err
