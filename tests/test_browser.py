"""The live page in a real headless Chromium: a wav fed as the microphone, frames drawn and counted.

Skipped when chromium / chromedriver are not installed (``apt-get install chromium chromium-driver``;
.ci/run installs them).  The measured end-to-end delay is printed and written to browser_delay.json in
the test's tmp folder."""
from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

from avatarforcing.live.launch import running_server
from live_server import example_wav

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason="chromium or chromedriver not found (apt-get install chromium chromium-driver)")


def _chrome(wav, profile):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(DRIVER))


def _wait(driver, condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    status = driver.find_element("id", "status").text
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (page status: {status!r})")


def test_page_streams_microphone_and_counts_frames(tmp_path):
    wav = example_wav(tmp_path / "mic.wav", seconds=6.0)
    with running_server() as url:
        driver = _chrome(wav, tmp_path / "profile")
        try:
            driver.get(url)
            driver.find_element("id", "start").click()
            count = lambda name: int(driver.find_element("id", name).text)   # noqa: E731
            _wait(driver, lambda: count("frames-drawn") >= 1 + 2 * 16, 40, "two blocks drawn")
            driver.find_element("id", "stop").click()
            _wait(driver, lambda: driver.find_element("id", "status").text == "done", 30, "the done message")
            _wait(driver, lambda: count("frames-drawn") + count("skipped") == count("frames-received"), 10,
                  "every received frame drawn or skipped")
            drawn, received, skipped, dropped = (count(n) for n in ("frames-drawn", "frames-received", "skipped", "dropped"))
            delay_mean = float(driver.find_element("id", "delay-mean-ms").text)
            pixel = driver.execute_script("return Array.from(document.getElementById('video').getContext('2d')"
                                          ".getImageData(160, 160, 1, 1).data)")
        finally:
            driver.quit()
    report = {"frames_drawn": drawn, "frames_received": received, "skipped": skipped, "dropped": dropped,
              "delay_mean_ms": delay_mean}
    (tmp_path / "browser_delay.json").write_text(json.dumps(report))
    print("browser:", json.dumps(report))
    assert drawn > 2 * 16 and received >= drawn
    assert received % 16 == 1 and dropped == 0         # the reference frame + whole blocks, none dropped
    assert pixel[3] == 255 and np.any(pixel[:3])        # the canvas shows a frame
    # the model waits for 2.56 s of audio past a block's start; a live delay is that plus a little
    assert 1000 < delay_mean < 10000
