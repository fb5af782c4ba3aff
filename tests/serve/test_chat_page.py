"""The chat page at `/`, driven in a real headless Chromium (Debian's chromium + chromedriver, through Selenium)
against `lamina serve` started as a user starts it: streamed replies, the stop button (the server's running count
drops to 0), settings that give the API's own reply, the conversation kept across a reload, model output with
<script> shown as text, refused requests shown in the page, and the API key asked for. Screenshots are written to
the test's tmp_path (printed; `pytest -s` shows where)."""

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

pytest.importorskip("selenium", reason="the test extra installs selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
KEY = "test-key-123"

if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):  # one line in pytest's summary for the module
    pytest.skip(
        "the chat page's browser tests need Chromium: apt-get install chromium chromium-driver (as root; .ci/run "
        "does; docs/testing.md)",
        allow_module_level=True,
    )


def _start(tmp_path_factory, *extra: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    cmd = [sys.executable, "-m", "lamina", "serve", "--port", str(port), "--max-seq-len", "1024"]
    proc = subprocess.Popen([*cmd, "--max-batch-size", "4", *extra], stderr=log.open("w"), stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("lamina serve did not come up: " + log.read_text())


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, url, log = _start(tmp_path_factory)
    yield url, log
    _stop(proc)


@pytest.fixture(scope="module")
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, read by _wait_idle
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def _open(browser, url: str) -> None:
    """The page, fresh: nothing kept from an earlier test."""
    browser.get(url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model-name").text)


def _set(browser, field: str, value) -> None:
    element = browser.find_element(By.ID, field)
    element.clear()
    element.send_keys(str(value))


def _send(browser, text: str) -> None:
    browser.get_log("browser")  # what the console said before this message is not this reply's
    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def _wait_idle(browser, timeout: float = 120) -> None:
    """Until the reply has ended (the send button is back), which it did without an error: none shown in the page,
    none in its console since the message was sent."""
    WebDriverWait(browser, timeout).until(lambda d: d.find_element(By.ID, "send").is_displayed())
    assert browser.find_element(By.ID, "error").text == ""
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors


def _stored(browser) -> list[dict]:
    return json.loads(browser.execute_script("return localStorage.getItem('lamina.conversation')") or "[]")


def _running(url: str) -> int:
    text = httpx.get(f"{url}/metrics").text
    return int(float(re.search(r"^lamina_requests_running (\S+)$", text, re.M).group(1)))


def _screenshot(browser, tmp_path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    browser.save_screenshot(str(path))
    print(f"screenshot: {path}")


# At each change of the conversation on the page: how long the reply is on the page, and how long its text is in
# the page's state (the text grows only; what is shown may shrink a little as Markdown closes, e.g. at `**`).
WATCH = """
window.__shown = []; window.__text = [];
new MutationObserver(() => {
  const bodies = document.querySelectorAll('#messages .message.assistant .body');
  if (!bodies.length) return;
  window.__shown.push(bodies[bodies.length - 1].textContent.length);
  window.__text.push(state.messages[state.messages.length - 1].content.length);
}).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
"""


def _api_reply(url: str, messages: list[dict], **settings) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    out = client.chat.completions.create(model=model, messages=messages, **settings)
    return out.choices[0].message.content


def test_a_reply_streams_token_by_token_with_its_counts_and_survives_a_reload(server, browser, tmp_path):
    url, log = server
    _open(browser, url)
    _set(browser, "temperature", 0)
    _set(browser, "max-tokens", 48)
    browser.execute_script(WATCH)
    question = "Explain how a bicycle works."
    _send(browser, question)
    _wait_idle(browser)
    shown, text = browser.execute_script("return [window.__shown, window.__text]")

    expected = _api_reply(url, [{"role": "user", "content": question}], temperature=0, max_tokens=48)
    stored = _stored(browser)
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[0]["content"] == question and stored[1]["content"] == expected
    stats = browser.find_element(By.CSS_SELECTOR, ".message.assistant .stats").text
    tokens = int(re.match(r"(\d+) tokens · [\d.]+ tokens/s · first token \d+ ms · prompt \d+ tokens", stats).group(1))
    assert tokens == stored[1]["stats"]["completion_tokens"] >= 16
    # The reply grew on the page piece by piece (about a token at a time), not in one go; its text only grew.
    assert len(set(shown)) >= tokens // 2 and len(set(text)) >= tokens // 2, (shown, text)
    assert text == sorted(text) and text[-1] == len(expected)
    _screenshot(browser, tmp_path, "reply")

    # Shift+Enter starts a new line instead of sending.
    box = browser.find_element(By.ID, "input")
    box.send_keys("first line", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "second line")
    assert box.get_attribute("value") == "first line\nsecond line"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#messages .message")) == 2
    box.clear()

    browser.refresh()  # the conversation comes back from local storage, its counts too
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#messages .message")) == 2)
    assert browser.find_element(By.CSS_SELECTOR, ".message.user .body").text == question
    assert browser.find_element(By.CSS_SELECTOR, ".message.assistant .stats").text == stats

    browser.find_element(By.ID, "new-chat").click()
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages .message") and _stored(browser) == []
    # The server logged the page's request: its route, its tokens, its finish.
    assert re.search(r"POST /v1/chat/completions 200 prompt_tokens=\d+ completion_tokens=%d " % tokens, log.read_text())


def test_a_long_reply_ends_as_cleanly_as_a_short_one(server, browser, tmp_path):
    url, _ = server
    _open(browser, url)
    _set(browser, "temperature", 0)
    _set(browser, "max-tokens", 320)
    question = "Write a long story about a lighthouse keeper and a storm, in three chapters."
    _send(browser, question)
    _wait_idle(browser)  # no error in the page or its console
    expected = _api_reply(url, [{"role": "user", "content": question}], temperature=0, max_tokens=320)
    stored = _stored(browser)
    assert stored[-1]["content"] == expected
    stats = stored[-1]["stats"]
    assert stats["completion_tokens"] >= 128 and not stats["ended_early"] and not stats["stopped"], stats
    _screenshot(browser, tmp_path, "long-reply")


def test_stop_aborts_the_request_on_the_server(server, browser, tmp_path):
    url, log = server
    _open(browser, url)
    _set(browser, "max-tokens", 900)
    _set(browser, "seed", 7)
    before = _finished(url, "abort")
    _send(browser, "Write a very long story about a dragon who learns to cook, in many chapters.")
    WebDriverWait(browser, 60).until(
        lambda d: len(d.find_element(By.CSS_SELECTOR, ".message.assistant .body").text) > 40
    )
    assert _running(url) == 1  # still generating
    browser.find_element(By.ID, "stop").click()
    deadline = time.monotonic() + 10
    while _running(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _running(url) == 0
    assert _finished(url, "abort") == before + 1
    _wait_idle(browser, 10)
    assert "stopped" in browser.find_element(By.CSS_SELECTOR, ".message.assistant .stats").text
    stored = _stored(browser)
    assert stored[-1]["stats"]["stopped"] and len(stored[-1]["content"]) > 40
    _screenshot(browser, tmp_path, "stopped")
    for _ in range(50):  # the log line is written when the response has ended
        if "finish=cancelled" in log.read_text():
            break
        time.sleep(0.1)
    assert re.search(
        r"POST /v1/chat/completions 200 prompt_tokens=\d+ completion_tokens=\d+ ttft=\S+ "
        r"finish=cancelled",
        log.read_text(),
    )


def _finished(url: str, reason: str) -> int:
    found = re.search(
        r'^lamina_requests_finished_total\{reason="%s"\} (\S+)$' % reason, httpx.get(f"{url}/metrics").text, re.M
    )
    return int(float(found.group(1))) if found else 0


def test_the_settings_give_the_reply_the_api_gives(server, browser):
    url, _ = server
    _open(browser, url)
    system, question = "You are a cheerful pirate.", "Tell me about the sea."
    _set(browser, "system", system)
    _set(browser, "temperature", 1.1)
    _set(browser, "top-p", 0.95)
    _set(browser, "max-tokens", 40)
    _set(browser, "seed", 1234)
    _send(browser, question)
    _wait_idle(browser)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    expected = _api_reply(url, messages, temperature=1.1, top_p=0.95, max_tokens=40, seed=1234)
    assert _stored(browser)[-1]["content"] == expected
    other = _api_reply(url, messages, temperature=1.1, top_p=0.95, max_tokens=40, seed=1235)
    assert other != expected  # the seed mattered, so the equality above says the page sent it
    browser.refresh()  # the settings are kept too
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .message"))
    assert browser.find_element(By.ID, "seed").get_attribute("value") == "1234"
    assert browser.find_element(By.ID, "system").get_attribute("value") == system


def test_model_output_with_script_is_shown_as_text(server, browser, tmp_path):
    url, _ = server
    _open(browser, url)
    system = "Repeat the user's message exactly, with nothing else."
    question = "<script>document.title='pwned'</script>"
    settings = dict(temperature=0, max_tokens=60)
    expected = _api_reply(
        url, [{"role": "system", "content": system}, {"role": "user", "content": question}], **settings
    )
    tag = "<script>document.title='pwned'</script>"
    assert tag in expected  # the model does write the script tag here (greedy): the page must show it as text
    _set(browser, "system", system)
    _set(browser, "temperature", 0)
    _set(browser, "max-tokens", 60)
    _send(browser, question)
    _wait_idle(browser)
    body = browser.find_element(By.CSS_SELECTOR, ".message.assistant .body")
    assert tag in body.text
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages script")
    assert browser.title == "lamina"
    if "```" in expected:  # a fenced block in the reply is a code block
        assert body.find_elements(By.CSS_SELECTOR, ".codeblock pre code")
    _screenshot(browser, tmp_path, "script-as-text")


def test_markdown_is_built_from_text_only(server, browser):
    """The renderer on a reply written by hand (through local storage): HTML in any Markdown construct stays text."""
    url, _ = server
    _open(browser, url)
    reply = (
        "# Title <img src=x onerror=\"document.title='pwned'\">\n\n"
        "Some **bold <b>x</b>** and *italic* and `code <i>` and [a link](javascript:alert(1)) and "
        "[web](https://example.com).\n\n- one <u>u</u>\n- two\n\n1. first\n2. second\n\n> quoted <s>s</s>\n\n"
        "```python\nprint('<script>alert(1)</script>')\n```\n"
    )
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
    browser.execute_script("localStorage.setItem('lamina.conversation', arguments[0])", json.dumps(conversation))
    browser.refresh()
    body = WebDriverWait(browser, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, ".message.assistant .body"))
    tags = [e.tag_name for e in body.find_elements(By.CSS_SELECTOR, "*")]
    assert not {"img", "b", "i", "u", "s", "script"} & set(tags), tags
    assert body.find_element(By.CSS_SELECTOR, "h1").text == "Title <img src=x onerror=\"document.title='pwned'\">"
    assert body.find_element(By.CSS_SELECTOR, "strong").text == "bold <b>x</b>"
    assert body.find_element(By.CSS_SELECTOR, "p code").text == "code <i>"
    links = body.find_elements(By.CSS_SELECTOR, "a")
    assert [a.get_attribute("href") for a in links] == ["https://example.com/"]  # javascript: stays text
    assert [li.text for li in body.find_elements(By.CSS_SELECTOR, "ul li")] == ["one <u>u</u>", "two"]
    assert [li.text for li in body.find_elements(By.CSS_SELECTOR, "ol li")] == ["first", "second"]
    assert body.find_element(By.CSS_SELECTOR, "blockquote").text == "quoted <s>s</s>"
    assert body.find_element(By.CSS_SELECTOR, ".codeblock pre code").text == "print('<script>alert(1)</script>')"
    assert body.find_element(By.CSS_SELECTOR, ".codeblock .language").text == "python"
    assert browser.title == "lamina"


def test_a_refused_request_is_shown_and_its_text_given_back(server, browser):
    url, _ = server
    _open(browser, url)
    _set(browser, "max-tokens", 100000)
    _send(browser, "Hello there")
    error = WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "error").text)
    assert "400" in error and "maximum context length is 1024 tokens" in error
    assert browser.find_element(By.ID, "input").get_attribute("value") == "Hello there"
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages .message") and _stored(browser) == []


def test_with_an_api_key_the_page_asks_for_it(tmp_path_factory, browser, tmp_path):
    proc, url, _ = _start(tmp_path_factory, "--api-key", KEY)
    try:
        browser.get(url + "/")
        browser.execute_script("localStorage.clear()")
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "key-form").is_displayed())
        assert "401" in browser.find_element(By.ID, "error").text
        _screenshot(browser, tmp_path, "api-key")
        browser.execute_script("document.getElementById('error').textContent = ''")
        _set(browser, "api-key", "wrong")
        browser.find_element(By.ID, "api-key").send_keys(Keys.ENTER)
        WebDriverWait(browser, 30).until(lambda d: "401" in d.find_element(By.ID, "error").text)  # refused again
        assert (
            browser.find_element(By.ID, "key-form").is_displayed()
            and not browser.find_element(By.ID, "model-name").text
        )
        _set(browser, "api-key", KEY)
        browser.find_element(By.ID, "api-key").send_keys(Keys.ENTER)
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model-name").text)
        assert not browser.find_element(By.ID, "key-form").is_displayed()
        _set(browser, "max-tokens", 8)
        _send(browser, "Hi")
        _wait_idle(browser)
        assert _stored(browser)[-1]["role"] == "assistant" and _stored(browser)[-1]["content"]
    finally:
        _stop(proc)


def test_no_ui_serves_the_api_only_and_log_levels(tmp_path_factory):
    proc, url, log = _start(tmp_path_factory, "--no-ui", "--log-level", "warning")
    try:
        page = httpx.get(url + "/")
        assert page.status_code == 404 and page.json()["error"]["type"] == "not_found_error"
        assert httpx.get(url + "/v1/models").status_code == 200
    finally:
        _stop(proc)
    assert " INFO " not in log.read_text()


def test_the_startup_lines_say_what_the_server_is(server):
    url, log = server
    text = log.read_text()
    port = url.rsplit(":", 1)[1]
    for pattern in (
        r"INFO lamina.serve: model SmolLM2-135M-Instruct.Q4_1.gguf \(.*134.5M parameters, 30 layers\)",
        r"INFO lamina.serve: dtype float32, device cpu, weights Q4_1 x120, Q8_0 x1 projections",
        r"INFO lamina.serve: kernel path \w+ \(CPU: .*\); prefill (native C step|PyTorch), .*; decode step native C",
        r"INFO lamina.serve: KV cache 4096 tokens \(256 blocks of 16, float32, \d+ MiB\), batch 4, prefix caching on",
        rf"INFO lamina.serve: chat page at http://127.0.0.1:{port}/; API at http://127.0.0.1:{port}/v1",
    ):
        assert re.search(pattern, text), (pattern, text)
