"""The chat page at / in headless Chromium (Debian's chromium and chromium-driver, driven by
selenium): it asks for the API key the server wants, sends a message, shows the streamed greedy
answer (generate's on the rendered conversation), and sends the whole conversation next turn."""

import shutil

import httpx
import pytest

from llmtp.common.formats.chat_template import BUILTIN_TEMPLATES, ChatMessage, encode_chat
from llmtp.common.formats.checkpoint import load_checkpoint
from llmtp.common.formats.tokenizer import load_tokenizer
from llmtp.coordinator.commands.engines import DEFAULT_MODEL_DIR
from llmtp.coordinator.local_engine import LocalEngine

from serve_tools import DEADLINE_S, BackgroundServer
from test_serve_api import greedy_text

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
API_KEY = "page-key"
MAX_TOKENS = 16

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
    pytest.skip("no Debian chromium + chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def model():
    checkpoint = load_checkpoint(DEFAULT_MODEL_DIR / "model.bin")
    return checkpoint, load_tokenizer(DEFAULT_MODEL_DIR / "tokenizer.model", checkpoint.config.vocab_size)


@pytest.fixture(scope="module")
def server(model):
    checkpoint, tokenizer = model
    running = BackgroundServer(LocalEngine(checkpoint.config, checkpoint.weights, n_slots=2), tokenizer,
                               api_key=API_KEY).start()
    yield running
    running.stop()


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(DEADLINE_S)
    yield driver
    driver.quit()


def wait_idle(browser, n_answers):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, DEADLINE_S).until(
        lambda page: page.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle"
        and len(page.find_elements(By.CSS_SELECTOR, ".message.assistant")) == n_answers)
    errors = browser.find_elements(By.CSS_SELECTOR, ".message.error")
    assert not errors, errors[0].text
    return browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1].get_attribute("textContent")


def test_page_is_served_as_html(server):
    response = httpx.get(server.base_url + "/", timeout=DEADLINE_S)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "v1/chat/completions" in response.text


def test_page_streams_an_answer_and_keeps_the_conversation(server, browser, model):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, tokenizer = model
    template = BUILTIN_TEMPLATES["llama2"]
    browser.get(server.base_url + "/")
    key_field = browser.find_element(By.ID, "api_key")
    WebDriverWait(browser, DEADLINE_S).until(lambda page: key_field.is_displayed())  # the server wants a key
    key_field.send_keys(API_KEY)
    for field, value in (("temperature", "0"), ("max_tokens", str(MAX_TOKENS))):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)

    # Count the answer's updates as they land: a streamed answer is written piece by piece.
    browser.execute_script("""
        window.answerUpdates = 0;
        new MutationObserver((records) => {
            for (const r of records) if (r.target.classList && r.target.classList.contains("assistant")) window.answerUpdates++;
        }).observe(document.getElementById("log"), {childList: true, subtree: true});""")
    first = [ChatMessage("user", "Who goes there?")]
    browser.find_element(By.ID, "input").send_keys(first[0].content)
    browser.find_element(By.ID, "send").click()
    answer = wait_idle(browser, 1)
    assert browser.execute_script("return window.answerUpdates") >= 2
    expected, _ = greedy_text(model, encode_chat(tokenizer, template, first), MAX_TOKENS)
    assert answer == expected and answer

    second = first + [ChatMessage("assistant", answer), ChatMessage("user", "What news?")]
    browser.find_element(By.ID, "input").send_keys(second[-1].content)
    browser.find_element(By.ID, "send").click()
    answer2 = wait_idle(browser, 2)
    expected2, _ = greedy_text(model, encode_chat(tokenizer, template, second), MAX_TOKENS)
    assert answer2 == expected2
    user_texts = [e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, ".message.user")]
    assert user_texts == ["Who goes there?", "What news?"]
