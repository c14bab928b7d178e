"""The web page in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium) against a
real ``facesphere serve`` process: wrong key refused, upload a photo, faces drawn, enrol a face, identify it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import require_data
from PIL import Image

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCRFD = "weights/scrfd_500m_kps_onnx/scrfd_500m_bnkps.onnx"
CACD = "data/cacd_vs_fold1/CACD_VS"
KEY = "page-test-key-0123456789"
FIRST_FACE_COLOUR = (230, 25, 75)  # page.js COLOURS[0], #e6194b


def _require_browser() -> None:
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    reason = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
    if os.environ.get("FACESPHERE_REQUIRE_BROWSER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from facesphere.models import import_weights
    from facesphere.models.store import save_model
    from facesphere.service.process import ServerProcess

    _require_browser()
    root = tmp_path_factory.mktemp("served")
    save_model(root / "y1", *import_weights(require_data("weights/mobilefacenet_insightface_y1")))
    (root / "keys.txt").write_text(KEY + "\n")
    args = ["--gallery", str(root / "gallery.sqlite"), "--model", str(root / "y1"), "--detector", "scrfd",
            "--detector-weights", str(require_data(SCRFD)), "--api-keys", str(root / "keys.txt"),
            "--match-threshold", "0.3"]
    with ServerProcess(args, log=root / "server.log") as process:
        yield process


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _require_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait_for(driver, condition, what: str, timeout: float = 60.0):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout).until(lambda d: condition(d))
    except Exception as error:  # noqa: BLE001 - re-raised with the page's status for a readable failure
        status = driver.find_element("id", "status").text
        raise AssertionError(f"timed out waiting for {what}; page status: {status!r}") from error


def _set_key(driver, key: str) -> None:
    field = driver.find_element("id", "api-key")
    field.clear()
    field.send_keys(key)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)


def _identify(driver, photo: Path) -> None:
    driver.find_element("id", "photo").send_keys(str(photo))
    driver.find_element("id", "identify").click()
    _wait_for(driver, lambda d: "face(s) found" in d.find_element("id", "status").text, f"faces of {photo.name}")


def _canvas_pixel(driver, x: float, y: float) -> tuple[int, int, int]:
    return tuple(driver.execute_script(
        "const c = document.getElementById('canvas');"
        "return Array.from(c.getContext('2d').getImageData(arguments[0], arguments[1], 1, 1).data.slice(0, 3));",
        int(x), int(y)))


def test_page_identifies_draws_and_enrols_in_headless_chromium(server, browser, tmp_path):
    import httpx

    browser.get(server.url + "/")
    assert browser.title == "facesphere"
    _set_key(browser, "not-the-key-at-all")
    _wait_for(browser, lambda d: "invalid API key" in d.find_element("id", "status").text, "the refusal of a wrong key")

    _set_key(browser, KEY)
    _wait_for(browser, lambda d: "mobilefacenet_insightface_y1" in d.find_element("id", "info").text, "model info")
    first, later = require_data(CACD) / "0001_0.jpg", require_data(CACD) / "0001_1.jpg"
    _identify(browser, first)
    faces = browser.find_elements("css selector", "#faces > li.face")
    assert len(faces) == 1 and "gallery is empty" in faces[0].text

    # the face is drawn where the API says it is: box edge and landmarks in the first face colour
    api = httpx.post(server.url + "/v1/detect", headers={"X-API-Key": KEY},
                     files={"image": (first.name, first.read_bytes(), "image/jpeg")}).json()
    width, height = Image.open(first).size
    scale = float(browser.execute_script("return canvas.dataset.scale"))
    assert scale == pytest.approx(min(900 / width, 600 / height))
    assert browser.execute_script("return [canvas.width, canvas.height]") == [round(width * scale), round(height * scale)]
    x1, y1, x2, y2 = (v * scale for v in api["faces"][0]["box"])
    # the 2-pixel box line is drawn on whole pixels: the row just above each horizontal edge is pure colour
    assert _canvas_pixel(browser, (x1 + x2) / 2, round(y2) - 1) == FIRST_FACE_COLOUR
    assert _canvas_pixel(browser, round(x1) - 1, (y1 + y2) / 2) == FIRST_FACE_COLOUR
    for x, y in api["faces"][0]["landmarks"]:
        assert _canvas_pixel(browser, x * scale, y * scale) == FIRST_FACE_COLOUR

    faces[0].find_element("css selector", ".enrol-name").send_keys("Alice Example")
    faces[0].find_element("css selector", "form.enrol button").click()
    _wait_for(browser, lambda d: "Alice Example — 1 template(s)" in d.find_element("id", "identities").text,
              "the enrolled identity in the list")

    _identify(browser, later)  # the same person years later
    rows = _wait_for(browser, lambda d: d.find_elements("css selector", "#faces tr.match"), "match rows")
    name, score, verdict = (cell.text for cell in rows[0].find_elements("tag name", "td"))
    assert (name, verdict) == ("Alice Example", "match") and "known" in rows[0].get_attribute("class")
    assert 0.3 <= float(score) <= 1.0

    listed = httpx.get(server.url + "/v1/identities", headers={"X-API-Key": KEY}).json()
    assert [(i["name"], i["templates"]) for i in listed] == [("Alice Example", 1)]
    shot = tmp_path / "web_page.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as image:
        assert image.size[0] >= 1000
    if os.environ.get("FACESPHERE_SCREENSHOTS"):
        target = Path(os.environ["FACESPHERE_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / shot.name)


TRICKY_NAMES = ["Zoë Ångström", "a b  c", "100% sure", "#1 fan", "who? me", "O'Brien \"the\" 2nd",
                "<img src=x onerror=\"document.title='pwned'\">", "<script>document.title='pwned'</script>", "a/b",
                "../x", "x/..", "%2F%00", "back\\slash"]


def test_tricky_names_are_shown_verbatim_and_deleted_by_the_page_button(server, browser):
    """Names with spaces, %, #, ?, quotes, slashes and HTML are listed as text (no markup runs) and each is deleted
    by clicking its own delete button on the page; the API then no longer lists it."""
    import httpx

    photo = require_data(CACD) / "0002_0.jpg"
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as api:
        for name in TRICKY_NAMES:
            made = api.post("/v1/identities", data={"name": name},
                            files={"images": (photo.name, photo.read_bytes(), "image/jpeg")})
            assert made.status_code == 201 and made.json()["name"] == name, made.text
        browser.get(server.url + "/")
        _set_key(browser, KEY)
        shown = lambda d: d.execute_script(  # noqa: E731
            "return [...document.querySelectorAll('#identities li.identity')].map(li => li.dataset.name)")
        _wait_for(browser, lambda d: set(TRICKY_NAMES) <= set(shown(d)), "the tricky names in the list")
        assert browser.title == "facesphere", "a name's markup ran"
        assert not browser.find_elements("css selector", "#identities img, #identities script")
        for name in TRICKY_NAMES:
            item = browser.execute_script(
                "return [...document.querySelectorAll('#identities li.identity')].find(li => li.dataset.name === "
                "arguments[0])", name)
            visible = " ".join(name.split())  # as the browser renders it: runs of spaces collapse
            assert item.text.startswith(visible), (name, item.text)  # shown as text, verbatim
            item.find_element("tag name", "button").click()
            _wait_for(browser, lambda d: name not in shown(d), f"{name!r} gone from the page")
            assert f"removed {visible}" in browser.find_element("id", "status").text
        listed = {i["name"] for i in api.get("/v1/identities").json()}
        assert not listed & set(TRICKY_NAMES), listed
        assert browser.title == "facesphere"
