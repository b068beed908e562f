"""live.serve's page in a real browser: Debian's chromium, headless, with a fake camera.

The camera is chromium's own fake device reading a .y4m file written here from test images
(4:2:0, the raw planes after a short text header). Selenium drives the browser through Debian's
chromedriver; nothing is downloaded. `make browser` installs both where missing; under CI
(``CI=true``) a missing browser fails these tests instead of skipping them.

The page shows what the server answered for the JPEG the browser itself encoded, so the labels
are checked against `predict` on exactly those bytes (CPU, fp32, within 1e-5), which the page
keeps beside the reply it drew.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

import live
from conftest import pattern_image
from live.serve import app

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_S = 60
TOLERANCE = 1e-5  # CPU, fp32

# Reads what the page last drew (the labels in the page and the reply and JPEG behind them).
READ_SHOWN = """
const done = arguments[arguments.length - 1];
const shown = window.shown;
const labels = [...document.querySelectorAll("#labels .label")].map((item) => ({
  name: item.querySelector(".name").textContent, prob: Number(item.dataset.prob)}));
const reader = new FileReader();
reader.onload = () => done({jpeg: reader.result.split(",")[1], labels, reply: shown.reply});
reader.readAsDataURL(shown.blob);
"""


def write_y4m(path: Path, frames_bgr: list[np.ndarray], fps: int = 10) -> Path:
    """A YUV4MPEG2 file, 4:2:0: a text header, then per frame "FRAME" and the Y, U, V planes."""
    height, width = frames_bgr[0].shape[:2]
    with open(path, "wb") as stream:
        stream.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for bgr in frames_bgr:
            stream.write(b"FRAME\n" + cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420).tobytes())
    return path


def camera_frame(label: int = 1, width: int = 320, height: int = 240) -> np.ndarray:
    """One class's pattern at a camera's shape (BGR)."""
    rgb = np.asarray(pattern_image(label, 5, size=width))[:height]
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)


@pytest.fixture
def browser(tmp_path):
    """Headless chromium whose camera shows `camera_frame()`; fails under CI when missing."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        reason = "chromium and chromedriver are not installed (make browser)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    video = write_y4m(tmp_path / "camera.y4m", [camera_frame()] * 10)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # as root, as CI runs
        "--disable-dev-shm-usage",
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-video-capture={video.resolve()}",
        "--window-size=900,560",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


def wait_for(driver, script: str, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(
        lambda d: d.execute_script(script), message=f"the page never showed {what}"
    )


def test_the_page_shows_predict_of_the_frames_the_browser_sent(browser, model_dir, tmp_path):
    predictor = live.load(model_dir, device="cpu")
    server = app.Running(app.build(predictor, app.Settings(topk=3)))
    try:
        browser.get(server.url("/"))
        wait_for(browser, "return window.shown !== null", "a reply")
        seen = browser.execute_async_script(READ_SHOWN)
        replies_before = browser.execute_script("return window.shown.reply.frame")
        # At most one frame in flight: the page's queue of awaited replies never holds two.
        in_flight = [
            browser.execute_script('return expected.filter((kind) => kind === "frame").length')
            for _ in range(50)
        ]
        wait_for(browser, f"return window.shown.reply.frame > {replies_before + 3}", "more frames")
        stats = browser.find_element("id", "stats").text
        screenshot = tmp_path / "page.png"
        browser.save_screenshot(str(screenshot))
    finally:
        server.stop()
    sent = tmp_path / "sent.jpg"
    sent.write_bytes(base64.b64decode(seen["jpeg"]))
    expected = predictor.predict(sent, topk=3)
    assert [label["name"] for label in seen["labels"]] == [entry["name"] for entry in expected]
    np.testing.assert_allclose(
        [label["prob"] for label in seen["labels"]],
        [entry["prob"] for entry in expected],
        rtol=0,
        atol=TOLERANCE,
    )
    # The camera's picture reached the server: its class is the one of the fake camera's image.
    camera = predictor.predict_bgr(camera_frame(), topk=1)[0]
    assert expected[0]["name"] == camera["name"]
    assert predictor.predict_bgr(camera_frame(label=0), topk=1)[0]["name"] != camera["name"]
    assert "fps" in stats and "round trip" in stats and "server" in stats
    assert set(in_flight) <= {0, 1} and 1 in in_flight
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_class_taught_through_the_page_is_then_shown_for_the_camera(
    browser, weights_file, tmp_path
):
    from selenium.webdriver.common.action_chains import ActionChains
    from test_live_serve import checkerboard

    # A head of taught classes only, one taught from files: the camera's frames are "checks".
    predictor = live.load(None, device="cpu", weights=weights_file, backbone="alexnet")
    for index in range(4):
        (tmp_path / f"check{index}.jpg").write_bytes(checkerboard(index))
    predictor.teach("checks", sorted(tmp_path.glob("check*.jpg")))
    server = app.Running(app.build(predictor, app.Settings(topk=2, save_dir=tmp_path)))
    top_label = "return document.querySelector('#labels .label .name').textContent"
    try:
        browser.get(server.url("/"))
        wait_for(browser, "return window.shown !== null", "a reply")
        before = browser.execute_script(top_label)
        browser.find_element("id", "class-name").send_keys("my mug")
        button = browser.find_element("id", "teach")
        ActionChains(browser).click_and_hold(button).pause(2.0).release(button).perform()
        wait_for(
            browser,
            "return document.querySelector('#taught li[data-name=\"my mug\"]') !== null",
            "the taught class in its list",
        )
        wait_for(browser, f"{top_label} === 'my mug'", "the taught class as the top label")
        message = browser.find_element("id", "message").text
    finally:
        server.stop()
    assert before == "checks"
    assert predictor.names == ["checks", "my mug"] and predictor.taught["my mug"] >= 1
    assert message.startswith("taught my mug:")
