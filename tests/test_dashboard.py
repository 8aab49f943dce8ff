"""A study made by ``spt hpo`` opened in optuna-dashboard, checked in a real headless browser
(Playwright driving Chromium): the trials and their selected layers and gates are there."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import tiny_config

from search.cli import main

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "") if p and Path(p).is_file()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {seconds}s")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (.ci/run installs Debian's chromium)")
def test_trials_and_their_layers_appear_in_optuna_dashboard(tmp_path, tiny_bert):
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is in the dev and track extras")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    config = tiny_config(tmp_path, tiny_bert, hpo={"space": {"select.k": [1, 2]}, "sampler": "random"}, search={"epochs": 1})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["hpo", str(config), "--trials", "2", "--storage", storage, "--study", "layers", "--out", str(tmp_path / "t"), "--quiet"]) == 0
    import optuna

    trials = optuna.load_study(study_name="layers", storage=storage).trials
    port = _free_port()
    command = [sys.executable, "-c", "import sys; from optuna_dashboard._cli import main; sys.exit(main())",
               storage, "--port", str(port), "--quiet"]  # optuna-dashboard's own command, in this interpreter
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(f"http://127.0.0.1:{port}/dashboard")
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/dashboard")
            page.wait_for_selector("text=layers", timeout=30_000)  # the study is listed
            page.goto(f"http://127.0.0.1:{port}/dashboard/studies/1/trials")
            page.wait_for_selector("text=selected_layers", timeout=30_000)
            text = page.inner_text("body")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert "2 Trials" in text and "Trial 0" in text and "Trial 1" in text
    first = trials[0].user_attrs
    assert f"selected_layers {first['selected_layers']}" in text
    assert "gates [" in text and str(first["gates"][0]) in text
