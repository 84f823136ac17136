"""The web playground in headless Chromium against the real server: streaming, stop, and no outside requests."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from tests.conftest import REPO, LiveServer, start_server, stop_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="Debian's chromium and chromium-driver are not installed (make system-deps)")
ARTEFACTS = REPO / "tests" / "artefacts"


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tmp_path_factory.mktemp("ui"), "--parallel", "2")
    yield server
    stop_server(server)


@pytest.fixture
def browser():  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--window-size=1100,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def requested_urls(driver) -> list[str]:  # type: ignore[no-untyped-def]
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def test_completion_streams_token_by_token_and_matches_the_api(ui_server: LiveServer, browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    browser.get(ui_server.url + "/")
    wait_for(lambda: "context" in browser.find_element(By.ID, "model").text)
    assert "SmolLM2-135M-Instruct.Q4_1" in browser.find_element(By.ID, "model").text
    browser.find_element(By.CSS_SELECTOR, "input[value=completion]").click()
    for field, value in (("max_tokens", "40"), ("temperature", "0"), ("seed", "7")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "prompt").send_keys("Once upon a time")
    browser.find_element(By.ID, "send").click()

    answer = lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")  # noqa: E731
    lengths = set()
    wait_for(lambda: answer())
    while not answer()[-1].get_attribute("data-done"):
        lengths.add(len(answer()[-1].text))
        time.sleep(0.01)
    shown = answer()[-1].text
    assert len(lengths) >= 3  # it grew in steps: streamed, not shown all at once
    expected = httpx.post(ui_server.url + "/generate", timeout=60, json={
        "prompt": "Once upon a time", "max_length": 40, "temperature": 0, "top_p": 0.95}).json()["text"]
    assert shown == expected.strip() or shown == expected
    stats = browser.find_element(By.ID, "stats").text
    assert "TTFT" in stats and "40 tokens" in stats
    ARTEFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTEFACTS / "playground.png"))
    hosts = {urlparse(u).netloc for u in requested_urls(browser) if u.startswith("http")}
    assert hosts == {urlparse(ui_server.url).netloc}  # nothing from outside the server


def test_chat_mode_and_stop_button_free_the_slot(ui_server: LiveServer, browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    browser.get(ui_server.url + "/")
    wait_for(lambda: "context" in browser.find_element(By.ID, "model").text)
    max_tokens = browser.find_element(By.ID, "max_tokens")
    max_tokens.clear()
    max_tokens.send_keys("1500")
    browser.find_element(By.ID, "prompt").send_keys("Write a very long story about the sea.")
    browser.find_element(By.ID, "send").click()
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")[-1].text) > 20)

    def busy() -> float:
        text = httpx.get(ui_server.url + "/metrics").text
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("llama_slots_busy ")))

    assert busy() == 1.0
    browser.find_element(By.ID, "stop").click()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")[-1].get_attribute("data-done"))
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")[-1].text.endswith("[stopped]")
    wait_for(lambda: busy() == 0.0, timeout=5)


def test_api_key_is_asked_for_and_sent(tmp_path: Path, browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    server = start_server(tmp_path, "--api-key", "sk-ui-test-8e2b41")
    try:
        browser.get(server.url + "/")
        wait_for(lambda: browser.find_element(By.ID, "key_row").is_displayed())
        browser.find_element(By.CSS_SELECTOR, "input[value=completion]").click()
        browser.find_element(By.ID, "prompt").send_keys("Hello")
        browser.find_element(By.ID, "send").click()
        error = wait_for(lambda: browser.find_element(By.ID, "error").text)
        assert "API key" in error
        browser.find_element(By.ID, "api_key").send_keys("sk-ui-test-8e2b41")
        browser.find_element(By.ID, "send").click()
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")[-1].get_attribute("data-done"))
        assert not browser.find_element(By.ID, "error").is_displayed()
        assert browser.execute_script("return window.localStorage.length + window.sessionStorage.length") == 0
    finally:
        stop_server(server)


def test_enter_sends_shift_enter_breaks_the_line_and_the_system_prompt_is_used(ui_server: LiveServer,
                                                                                browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(ui_server.url + "/")
    wait_for(lambda: "context" in browser.find_element(By.ID, "model").text)
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("What is")
    ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
    assert prompt.get_attribute("value") == "What is\n"  # a new line, nothing sent
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg")
    prompt.clear()
    # Without a system prompt this small model, greedy, rambles about Paris' monuments; with one it answers.
    browser.find_element(By.ID, "system").send_keys("You are a helpful assistant.")
    prompt.send_keys("What is the capital of France?" + Keys.ENTER)
    answer = wait_for(lambda: [e for e in browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")
                               if e.get_attribute("data-done")])
    assert answer[-1].text == "The capital of France is Paris."
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user .text").text == "What is the capital of France?"
    # The system prompt is for chat; completion mode hides it.
    browser.find_element(By.CSS_SELECTOR, "input[value=completion]").click()
    assert not browser.find_element(By.ID, "system").is_displayed()


@pytest.mark.parametrize("width", [1280, 390])
def test_layout_holds_at_laptop_and_phone_width(ui_server: LiveServer, browser, width: int) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": 844 if width < 600 else 800, "deviceScaleFactor": 1,
                             "mobile": width < 600})
    browser.get(ui_server.url + "/")
    wait_for(lambda: "context" in browser.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "prompt").send_keys("Hello there")
    # Nothing sticks out sideways, and every control and button is inside the page.
    assert browser.execute_script("return document.documentElement.scrollWidth") <= width
    for element in browser.find_elements(By.CSS_SELECTOR, ".controls label, textarea, button"):
        if element.is_displayed():
            rect = element.rect
            assert rect["x"] >= 0 and rect["x"] + rect["width"] <= width, (element.text, rect)
    tops = {round(e.rect["y"]) for e in browser.find_elements(By.CSS_SELECTOR, ".controls > label:not(.wide)")
            if e.is_displayed()}
    if width == 1280:
        assert len(tops) == 1  # the sampling controls hold on one row
    ARTEFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTEFACTS / f"playground-{width}.png"))


def test_favicon_is_served(ui_server: LiveServer) -> None:
    resp = httpx.get(ui_server.url + "/favicon.ico")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/svg+xml"
    assert resp.text.startswith("<svg") and 'rel="icon"' in httpx.get(ui_server.url + "/").text


def test_the_playground_can_be_turned_off(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--no-ui")
    try:
        page = httpx.get(server.url + "/")
        assert page.status_code == 200 and "<html" not in page.text.lower()
        assert page.text == "Ollama is running"  # what Ollama answers there, for the clients that probe it
        assert httpx.get(server.url + "/static/app.js").status_code in (401, 404)
    finally:
        stop_server(server)
