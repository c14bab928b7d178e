"""The review page in a real headless Chromium against a real ``facesphere serve --review DIR`` process: the flagged
images are listed with their thumbnails (names shown as text), a flip is confirmed and an outlier rejected by
clicking, and the list files on disk say so; the API serves only images the review lists name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _noisy_set import HOSTILE, hashes, make_noisy_set
from _training import env
from conftest import require_data
from test_cleaning_review import decisions_on_disk, expected_kept
from test_web_page import KEY, SCRFD, _require_browser, _set_key, _wait_for, browser  # noqa: F401 - the fixture

from facesphere.data.lists import parse_list_file


@pytest.fixture(scope="module")
def review_server(tmp_path_factory):
    from facesphere.cleaning.lists import write_cleaned_lists
    from facesphere.models import import_weights
    from facesphere.models.store import save_model
    from facesphere.service.process import ServerProcess

    _require_browser()
    root = tmp_path_factory.mktemp("review")
    profile, images = make_noisy_set(root)
    write_cleaned_lists(profile, root / "out")
    save_model(root / "y1", *import_weights(require_data("weights/mobilefacenet_insightface_y1")))
    (root / "keys.txt").write_text(KEY + "\n")
    args = ["--gallery", str(root / "gallery.sqlite"), "--model", str(root / "y1"), "--detector", "scrfd",
            "--detector-weights", str(require_data(SCRFD)), "--api-keys", str(root / "keys.txt"),
            "--review", str(root / "out")]
    before = hashes(images)
    with ServerProcess(args, log=root / "server.log", env=env()) as process:
        yield process, root / "out", profile
    assert hashes(images) == before  # not one source image changed


def _item(driver, index: int):
    return driver.find_element("css selector", f"#items li.review-item[data-index='{index}']")


def test_review_page_confirms_a_flip_and_rejects_an_outlier_by_clicking(review_server, browser):  # noqa: F811
    import httpx

    server, out, profile = review_server
    browser.get(server.url + "/review")
    assert browser.title == "facesphere review"
    _set_key(browser, KEY)
    _wait_for(browser, lambda d: len(d.find_elements("css selector", "#items li.review-item")) == 4, "4 flagged items")
    assert browser.title == "facesphere review", "a name's markup ran"
    assert HOSTILE in _item(browser, 10).text  # shown verbatim, as text
    _wait_for(browser, lambda d: d.execute_script(
        "return [...document.querySelectorAll(\"li[data-index='3'] img\")].every(i => i.complete && i.naturalWidth > 0)"),
        "the thumbnails of the flip")
    shown = browser.execute_script(
        "return [...document.querySelectorAll(\"li[data-index='3'] img\")].map(i => Number(i.dataset.index))")
    assert shown == [3, 0, 1, 2, 5, 4]  # the flip, alice's typical images, bob's (the suggestion) by own cosine

    _item(browser, 3).find_element("css selector", "button.confirm").click()
    _wait_for(browser, lambda d: _item(d, 3).get_attribute("data-decision") == "confirmed", "the confirmed flip")
    _item(browser, 6).find_element("css selector", "button.reject").click()
    _wait_for(browser, lambda d: _item(d, 6).get_attribute("data-decision") == "rejected", "the rejected outlier")
    assert decisions_on_disk(out) == {3: "confirmed", 6: "rejected", 7: "pending", 10: "pending"}
    assert parse_list_file(out / "kept.txt") == expected_kept(profile, {3: "confirmed", 6: "rejected"})

    if os.environ.get("FACESPHERE_SCREENSHOTS"):
        target = Path(os.environ["FACESPHERE_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(target / "review_page.png"))

    browser.refresh()  # pending only: the decided items are gone
    _wait_for(browser, lambda d: len(d.find_elements("css selector", "#items li.review-item")) == 2, "2 pending items")

    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as api:
        assert {"/v1/review/items", "/v1/review/items/{index}", "/v1/review/images/{index}"} <= set(
            api.get("/openapi.json").json()["paths"])
        page = api.get("/v1/review/items", params={"offset": 1, "limit": 2}).json()
        assert (page["total"], [i["index"] for i in page["items"]]) == (4, [10, 6])
        assert api.get("/v1/review/items", params={"limit": 501}).status_code == 422
        assert api.get("/v1/review/images/4").headers["content-type"] == "image/jpeg"
        for index in (11, 12, 999):  # unreadable, missing, beyond the set: named by no review list
            answer = api.get(f"/v1/review/images/{index}")
            assert answer.status_code == 404 and "not named in the review lists" in answer.json()["error"]
        assert api.get("/v1/review/images/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)
        assert api.post("/v1/review/items/7", json={"decision": "maybe"}).status_code == 422
        assert api.post("/v1/review/items/0", json={"decision": "confirm"}).status_code == 404  # a clean image
        for path, method in (("/v1/review/items", "GET"), ("/v1/review/images/3", "GET"),
                             ("/v1/review/items/3", "POST")):
            assert api.request(method, path, headers={"X-API-Key": "wrong" * 8}).status_code == 401
    assert decisions_on_disk(out) == {3: "confirmed", 6: "rejected", 7: "pending", 10: "pending"}
