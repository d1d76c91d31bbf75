"""The browser playground at / in real headless Chromium (Debian's chromium + chromedriver, driven by Selenium)."""

from __future__ import annotations

import shutil

import pytest

from tests.serving import LiveServer, make_settings

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency: pip install -e '.[dev]'")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "Debian's chromium and chromium-driver are not installed (.ci/run installs them)", allow_module_level=True
    )

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # headless as root in a sandbox with no network: the flags that keep Chromium from phoning home
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def generate(browser, url: str, prompt: str, steps: str, n: int = 1, reload: bool = True):
    if reload:
        browser.get(url + "/")
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    Select(browser.find_element(By.ID, "steps")).select_by_value(steps)
    n_box = browser.find_element(By.ID, "n")
    n_box.clear()
    n_box.send_keys(str(n))
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 60).until(
        lambda d: (
            d.find_element(By.ID, "generate").is_enabled()
            and d.find_element(By.ID, "status").text not in ("", "generating…")
        )
    )


def test_type_a_prompt_click_generate_and_an_image_appears(browser, live):
    generate(browser, live.url, "a red 7 on black", "1", n=2)
    images = browser.find_elements(By.CSS_SELECTOR, "#images img")
    assert len(images) == 2
    for img in images:  # decoded: a real PNG the browser could draw, at the model's native size
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 32
    assert browser.find_element(By.ID, "served-by").text == "tiny-student"
    assert browser.find_element(By.ID, "latency").text.endswith(" ms")
    assert not browser.find_elements(By.ID, "fallback")


def test_teacher_choice_shows_who_served_and_why(browser, live):
    generate(browser, live.url, "a blue 3 on yellow", "teacher")
    assert browser.find_element(By.ID, "served-by").text == "tiny-teacher"
    assert browser.find_element(By.ID, "fallback").text == "fallback: teacher_requested"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#images img")) == 1


def test_server_errors_are_shown_not_swallowed(browser, live):
    generate(browser, live.url, "", "1")
    status = browser.find_element(By.ID, "status")
    assert "error" in status.get_attribute("class")
    assert status.text.startswith("400: ") and "prompt" in status.text


def test_page_sends_the_api_key(browser, models_dir):
    with LiveServer(make_settings(models_dir, api_keys=["s3cret"])) as server:
        generate(browser, server.url, "a red 7 on black", "1")
        assert browser.find_element(By.ID, "status").text.startswith("401: ")
        browser.find_element(By.ID, "key").send_keys("s3cret")
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 60).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#images img")))
        assert browser.find_element(By.ID, "served-by").text == "tiny-student"


def test_model_list_and_size_fields_reach_the_server(browser, live):
    browser.get(live.url + "/")
    WebDriverWait(browser, 30).until(lambda d: len(Select(d.find_element(By.ID, "model")).options) > 1)
    models = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "model")).options]
    assert models[0] == "" and {"tiny-teacher", "tiny-student"} <= set(models)  # from GET /v1/models
    Select(browser.find_element(By.ID, "model")).select_by_value("tiny-teacher")
    browser.find_element(By.ID, "width").send_keys("48")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text not in ("", "generating…"))
    status = browser.find_element(By.ID, "status").text
    assert status.startswith("400: ") and "tiny-teacher" in status and "width must be 32" in status
    browser.find_element(By.ID, "width").clear()
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 60).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#images img")))
    assert browser.find_element(By.ID, "served-by").text == "tiny-teacher"


def test_auto_steps_with_a_latency_target(browser, live):
    browser.get(live.url + "/")
    slo = browser.find_element(By.ID, "slo")
    slo.send_keys("0.000001")  # nothing meets it: the fastest student count, and the page says what auto chose
    generate(browser, live.url, "a green 4 on white", "auto", reload=False)
    seen = f"status {browser.find_element(By.ID, 'status').text!r}, meta {browser.find_element(By.ID, 'meta').text!r}"
    assert browser.find_element(By.ID, "served-by").text == "tiny-student", seen
    assert "1 step" in browser.find_element(By.ID, "meta").text, seen
    assert "target 0 ms" in browser.find_element(By.ID, "auto").text, seen


def test_the_gate_choice_reaches_the_server_and_each_image_says_who_made_it(browser, gated_dir):
    with LiveServer(make_settings(gated_dir, default_model="tiny-student")) as server:
        browser.get(server.url + "/")
        Select(browser.find_element(By.ID, "gate")).select_by_value("on")
        generate(browser, server.url, "a green 4 on white", "1", reload=False)
        captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#images figcaption")]
    assert browser.find_element(By.ID, "fallback").text == "fallback: quality_gate"
    assert captions and all("gate " in c and "tiny-teacher (quality_gate)" in c for c in captions)
