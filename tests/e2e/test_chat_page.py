"""The chat page of `forge serve`, in a real headless Chromium driven by selenium.

The server is the real command (`python -m forge_lm.trainer.serve <folder> --port 0`) in its own process.
A message typed into the page streams a reply into the conversation that equals, character for character,
the server's greedy reply to the same conversation through the official `openai` client; a second turn
carries the conversation on; the stop button ends a long reply mid-stream and frees its slot.

Chromium and its driver come from Debian's packages (chromium, chromium-driver), installed with apt-get
by this test when missing, as tests/launch/cluster.py installs SLURM. Without root or apt the test is
skipped, saying so. Nothing is downloaded at run time: selenium is given both programs' paths.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import openai
import pytest

from tests.conftest import REPO
from tests.e2e.serve_helpers import metric, tiny_hf_folder

APT_PACKAGES = ("chromium", "chromium-driver")
MAX_TOKENS = 24


def _programs() -> tuple[str | None, str | None]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    return browser, shutil.which("chromedriver")


def ensure_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing Debian's packages with apt-get when missing."""
    browser, driver = _programs()
    if browser and driver:
        return browser, driver
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(
            f"chromium/chromedriver missing and apt-get unusable here: install {' '.join(APT_PACKAGES)}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES]
    out = subprocess.run(install, env=env, capture_output=True, text=True)
    if out.returncode != 0:  # stale package lists: refresh once
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        out = subprocess.run(install, env=env, capture_output=True, text=True)
    browser, driver = _programs()
    if not (browser and driver):
        pytest.skip(
            f"apt-get install {' '.join(APT_PACKAGES)} failed (no package source?): {out.stderr[-500:]}"
        )
    return browser, driver


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """`forge serve` as a user starts it, on a free port it prints."""
    folder = tiny_hf_folder(tmp_path_factory.mktemp("chat"), max_seq_len=1024)
    process = subprocess.Popen(
        [sys.executable, "-m", "forge_lm.trainer.serve", str(folder), "--port", "0", "--max-batch", "4",
         "--model-name", "tiny-chat", "--log-level", "warning"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url, seen, deadline = None, [], time.monotonic() + 120
    while url is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        match = re.search(r"listening on (http://\S+) ", line)
        url = match.group(1) if match else None
    if url is None:
        process.kill()
        pytest.fail("forge serve did not start:\n" + "".join(seen))
    yield url
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = ensure_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1200,900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 60.0, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(lambda d: condition(d), message=what)


def _state(driver) -> str:
    return driver.execute_script("return document.body.dataset.state")


def _last_reply(driver) -> str:
    return driver.execute_script(
        "const r = document.querySelectorAll('.msg.assistant .content'); return r.length ? r[r.length - 1].textContent : null"
    )


def _set(driver, element_id: str, value: str) -> None:
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(value)


def _say(driver, text: str) -> None:
    _set(driver, "prompt", text)
    driver.find_element("id", "send").click()


def test_a_message_streams_the_servers_greedy_reply_into_the_conversation(server_url, browser) -> None:
    api = openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)
    browser.get(server_url + "/")
    _wait(browser, lambda d: "tiny-chat" in d.find_element("id", "model").text, what="the model's name")
    _set(browser, "temperature", "0")
    _set(browser, "max-tokens", str(MAX_TOKENS))
    conversation = []
    for message in ("Good morrow, friend!", "And what of the king?"):
        _say(browser, message)
        _wait(browser, lambda d: _state(d) == "done", what="the reply to finish")
        shown = _last_reply(browser)
        conversation.append({"role": "user", "content": message})
        want = api.chat.completions.create(
            model="tiny-chat", messages=conversation, temperature=0, max_tokens=MAX_TOKENS
        )
        assert shown and shown == want.choices[0].message.content
        conversation.append({"role": "assistant", "content": shown})
    bubbles = browser.find_elements("css selector", ".msg")
    assert [b.get_attribute("class") for b in bubbles] == ["msg user", "msg assistant"] * 2


def test_the_stop_button_ends_a_reply_mid_stream_and_frees_its_slot(server_url, browser) -> None:
    browser.get(server_url + "/")
    _wait(browser, lambda d: "tiny-chat" in d.find_element("id", "model").text, what="the model's name")
    _set(browser, "temperature", "0.8")
    _set(browser, "max-tokens", "1000")
    cancelled = metric(server_url, "forge_requests_finished_total", reason="cancelled")
    _say(browser, "Tell me a very long story.")
    # Text appears while the reply is still streaming.
    _wait(browser, lambda d: _state(d) == "streaming" and len(_last_reply(d) or "") > 0, what="streamed text")
    browser.find_element("id", "stop").click()
    _wait(browser, lambda d: _state(d) == "stopped", what="the page to stop")
    partial = _last_reply(browser)
    deadline = time.monotonic() + 20
    while metric(server_url, "forge_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server_url, "forge_requests_running") == 0
    assert metric(server_url, "forge_requests_finished_total", reason="cancelled") == cancelled + 1
    assert _last_reply(browser) == partial  # nothing arrives after the stop
    assert browser.find_element("id", "send").is_enabled()
