"""launch/demo.py in a real browser: headless Chromium (Debian's chromium + chromedriver)
driven with Selenium asks a question about a synthetic clip, and the answer, its timestamps,
the evidence plot and seeking the player by clicking a grounded segment all happen on the page.

Needs the ``demo`` and ``test`` extras and ``/usr/bin/chromium`` + ``/usr/bin/chromedriver``;
``.ci/run`` installs all of them, so in CI this test always runs.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from tests.crafted import crafted_workdir
from tests.smoke_data import smoke_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "launch", "demo.py")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ANSWER = "yellow circle"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    def config(data_dir):
        cfg = smoke_config(data_dir)
        cfg.stages = ("sft",)
        return cfg
    ckpt = crafted_workdir(tmp_path_factory.mktemp("demo_data"), tmp_path_factory.mktemp("demo_wd"), config,
                           answer_text=ANSWER)
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False")
    log = open(tmp_path_factory.mktemp("demo_log") / "server.log", "w+")
    server = subprocess.Popen([sys.executable, DEMO, "--checkpoint", ckpt["workdir"], "--port", str(port),
                               "--max_new_tokens", "12"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300
    try:
        while True:
            assert server.poll() is None, open(log.name).read()[-3000:]
            try:
                if urllib.request.urlopen(url, timeout=5).status == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "demo server did not come up:\n" + open(log.name).read()[-3000:]
            time.sleep(1.0)
        yield {"url": url, "port": port, "log": log.name, **ckpt}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), (
        "install Debian's chromium and chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tempfile.mkdtemp(prefix='d2vlm_chromium_')}", "--window-size=1400,1800",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):   # nothing but this machine
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def click(driver, find, timeout: float = 120.0) -> None:
    """Clicks the element ``find(driver)`` returns like a user, retrying while the page is
    still rendering (the element re-created, or covered by a spinner)."""
    from selenium.common.exceptions import WebDriverException
    deadline = time.time() + timeout
    while True:
        try:
            find(driver).click()
            return
        except WebDriverException:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.slow
def test_demo_answers_plots_and_seeks_in_a_browser(demo_server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert listening_addresses(demo_server["port"]) == {"0100007F"}    # 127.0.0.1 only
    browser.get(demo_server["url"])
    wait = WebDriverWait(browser, 240, poll_frequency=0.5)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#d2vlm-ask"))
    # pick the first held-out clip: it fills the video and the question
    examples = "#d2vlm-examples tr.tr-body, #d2vlm-examples .gallery-item"
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, examples))
    samples = json.load(open(os.path.join(demo_server["data_dir"], "val.json")))
    click(browser, lambda d: d.find_elements(By.CSS_SELECTOR, examples)[0])
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#d2vlm-question textarea").get_attribute("value")
               == samples[0]["question"])
    click(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#d2vlm-ask"))

    buttons = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "button.d2vlm-seek"))
    answer = browser.find_element(By.CSS_SELECTOR, "#d2vlm-answer").text
    assert f"Answer: {ANSWER}" in answer, answer
    assert len(buttons) == 1 and buttons[0].text.startswith("<evi> 1 (grounding): ")
    start, end = (float(x) for x in buttons[0].text.split(": ")[1].rstrip(" s").split(" - "))
    assert 0.0 <= start <= end <= samples[0]["duration"]
    assert f"Grounded (s): {start:.1f} - {end:.1f}" in answer
    # the evidence plot is an image on the page
    size = wait.until(lambda d: d.execute_script(
        "var i = document.querySelector('#d2vlm-plot img');"
        "return (i && i.complete && i.naturalWidth > 0) ? [i.naturalWidth, i.naturalHeight] : null;"))
    assert size[0] >= 800 and size[1] >= 400
    # clicking the segment seeks the player to its start (moved elsewhere first)
    wait.until(lambda d: d.execute_script(
        "var v = document.querySelector('#d2vlm-player video'); return v && v.readyState >= 1;"))
    duration = browser.execute_script("return document.querySelector('#d2vlm-player video').duration;")
    away = end + 1.0 if end + 1.0 < duration else (start + end) / 2 + 0.37
    browser.execute_script(f"document.querySelector('#d2vlm-player video').currentTime = {away};")
    wait.until(lambda d: abs(d.execute_script("return document.querySelector('#d2vlm-player video').currentTime;")
                             - away) < 1e-3)
    click(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "button.d2vlm-seek")[0])
    wait.until(lambda d: abs(d.execute_script("return document.querySelector('#d2vlm-player video').currentTime;")
                             - start) < 1e-3)
    browser.save_screenshot(str(tmp_path / "demo.png"))
