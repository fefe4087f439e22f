"""The web page in a real browser: headless Chromium (Debian's, through its chromedriver) against a
`hassod serve` subprocess on an index of the synthetic scenes, whose true regions nest wholes, parts
and subparts. Every state is saved as a screenshot under the test's temporary folder.

Needs /usr/bin/chromium and /usr/bin/chromedriver (.ci/install_chromium.sh) and selenium (the
``dev`` extra); without them these tests fail, saying so.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from scipy import ndimage

from hassod.runs import LEVEL_NAMES
from indexer.catalog import Catalog, RegionRecord
from indexer.index import Index
from tests.retrieval.retrieval_helpers import polygon_mask

REPO = Path(__file__).resolve().parents[2]
INSTALL_HINT = "run .ci/install_chromium.sh (as root) to install Debian's chromium and chromium-driver"
WAIT_S = 120  # an upload's regions are discovered in the server: the first time compiles the numba kernels

# The ids of the region outlines drawn and shown (display not none) in the image view.
_VISIBLE = """return [...document.querySelectorAll('#overlay path.region')]
    .filter((p) => getComputedStyle(p).display !== 'none' && p.getBoundingClientRect().width > 0)
    .map((p) => p.dataset.key);"""


def _browser_binaries() -> tuple[str, str]:
    found = [shutil.which(name) or f"/usr/bin/{name}" for name in ("chromium", "chromedriver")]
    missing = [path for path in found if not Path(path).is_file()]
    if missing:
        pytest.fail(f"the browser tests need {' and '.join(missing)}; {INSTALL_HINT}")
    return found[0], found[1]


@pytest.fixture(scope="module")
def catalog(scenes_index) -> Iterator[Catalog]:
    with Index.open(scenes_index[1]) as index:
        yield index.catalog


@pytest.fixture(scope="module")
def server(scenes_index, tmp_path_factory) -> Iterator[str]:
    """The base URL of `hassod serve` on the index, on a free port of 127.0.0.1."""
    logs = tmp_path_factory.mktemp("serve")
    out, err = (logs / "stdout.txt").open("w"), (logs / "stderr.txt").open("w")  # files: a full pipe would block it
    process = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "serve", "--index", str(scenes_index[1]),
                                "--port", "0", "--device", "cpu"], stdout=out, stderr=err, cwd=REPO, text=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while not (url := re.search(r"http://\S+/", (logs / "stdout.txt").read_text())):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"hassod serve did not start: {(logs / 'stderr.txt').read_text()[-3000:]}")
            time.sleep(0.2)
        yield url.group(0)
    finally:
        process.terminate()
        process.wait(timeout=60)
        out.close()
        err.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    chromium, chromedriver = _browser_binaries()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the browser tests need selenium: pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1700", "--no-proxy-server"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


class Page:
    """The page in the browser, with the waits and the reads the tests need; screenshots numbered in order."""

    def __init__(self, driver, url: str, shots: Path):
        self.driver, self.url, self.shots, self.taken = driver, url, shots, 0

    def screenshot(self, name: str) -> None:
        self.taken += 1
        self.driver.save_screenshot(str(self.shots / f"{self.taken:02d}_{name}.png"))

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def wait(self, condition, what: str) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(self.driver, WAIT_S).until(lambda _: condition(), message=f"waiting for {what}: "
                                                 + self.find("#status").text)

    def wait_view(self, src_part: str) -> None:
        """Until the image view shows the picture whose URL holds ``src_part``, with its regions drawn."""
        self.wait(lambda: src_part in (self.find("#preview").get_attribute("src") or "")
                  and self.find("#view").get_attribute("data-state") == "ready", f"the view of {src_part}")

    def visible(self) -> set[str]:
        return set(self.driver.execute_script(_VISIBLE))

    def click_at(self, x: float, y: float) -> None:
        """Click the image view at (x, y) original pixels of the image in view."""
        from selenium.webdriver.common.action_chains import ActionChains

        self.point_at(x, y, ActionChains(self.driver)).click().perform()

    def hover_at(self, x: float, y: float) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        self.point_at(x, y, ActionChains(self.driver)).perform()

    def point_at(self, x: float, y: float, actions):
        img = self.find("#preview")
        width = self.driver.execute_script("return view.width")
        scale = img.rect["width"] / width
        # Offsets count from the element's centre.
        return actions.move_to_element_with_offset(img, round((x + 0.5) * scale - img.rect["width"] / 2),
                                                   round((y + 0.5) * scale - img.rect["height"] / 2))

    def search_then(self, action) -> list[tuple[int, int]]:
        """Run ``action`` (which starts a search) and wait for its results: (image id, region id) of each."""
        self.driver.execute_script("document.getElementById('results').dataset.state = ''")
        action()
        self.wait(lambda: self.find("#results").get_attribute("data-state") == "done", "the results")
        return [(int(f.get_attribute("data-image-id")), int(f.get_attribute("data-region-id")))
                for f in self.find_all("#results figure")]

    def outline_d(self, key: str) -> str:
        return self.find(f'#overlay path[data-key="{key}"]').get_attribute("d")


@pytest.fixture
def page(browser, server, tmp_path) -> Page:
    browser.get(server)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    return Page(browser, server, shots)


def _inner_point(mask: np.ndarray, covering: list[np.ndarray]) -> tuple[int, int]:
    """(x, y) of the pixel of ``mask`` farthest from its edge and from the ``covering`` masks drawn over it:
    the pointer there is on this region and no other."""
    distance = _free_area(mask, covering)
    y, x = np.unravel_index(np.argmax(distance), distance.shape)
    assert distance[y, x] >= 3, "no room to click inside the region"
    return int(x), int(y)


def _free_area(mask: np.ndarray, covering: list[np.ndarray]) -> np.ndarray:
    """Each pixel's distance to the nearest pixel outside ``mask`` or inside one of ``covering``."""
    free = mask & ~np.any(covering, axis=0) if covering else mask
    return ndimage.distance_transform_edt(np.pad(free, 1))[1:-1, 1:-1]


def _click_point(regions: list[RegionRecord], target: RegionRecord) -> tuple[int, int]:
    """Where to click ``target`` in the view: smaller regions are drawn (and hit) above larger ones."""
    masks = {r.id: mask_utils.decode(r.mask_rle).astype(bool) for r in regions}
    covering = [masks[r.id] for r in regions if r.area < target.area]
    return _inner_point(masks[target.id], covering)


def _post_json(url: str, fields: dict[str, str], files: dict[str, Path] | None = None) -> dict:
    """A multipart POST, as the page sends it."""
    boundary = uuid.uuid4().hex
    body = b""
    for key, value in fields.items():
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
    for key, path in (files or {}).items():
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"; filename="{path.name}"\r\n'
                 f"Content-Type: image/png\r\n\r\n").encode() + path.read_bytes() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy for localhost
    with direct.open(request, timeout=WAIT_S) as response:
        return json.load(response)


def test_an_indexed_images_regions_are_outlined_and_toggled_by_level(page, catalog):
    image = catalog.indexed_images(3, 1)[1][0]
    regions = catalog.regions_of_image(image.id)
    by_level = {name: {str(r.id) for r in regions if r.level == level} for level, name in enumerate(LEVEL_NAMES)}
    assert all(by_level.values()), "the scene should hold wholes, parts and subparts"
    page.wait(lambda: len(page.find_all("#browse a")) == 8, "the index's images")
    page.screenshot("browser")
    page.find(f'#browse a[data-id="{image.id}"]').click()
    page.wait_view(f"/api/images/{image.id}?")
    assert page.visible() == set().union(*by_level.values())
    assert [int(s.text) for s in page.find_all("#toggles span")] == [len(by_level[n]) for n in LEVEL_NAMES]
    page.screenshot("all_levels")

    for name in LEVEL_NAMES:  # each level off on its own, then on again
        toggle = page.find(f'#toggles input[data-level="{name}"]')
        toggle.click()
        assert page.visible() == set().union(*(ids for other, ids in by_level.items() if other != name))
        page.screenshot(f"without_{name}s")
        toggle.click()
    for name in LEVEL_NAMES[:2]:
        page.find(f'#toggles input[data-level="{name}"]').click()
    assert page.visible() == by_level["subpart"]
    page.screenshot("subparts_only")
    for name in LEVEL_NAMES[:2]:
        page.find(f'#toggles input[data-level="{name}"]').click()

    # Hovering a subpart highlights it and names it with its chain of parents.
    subpart = next(r for r in regions if r.level == 2)
    part = next(r for r in regions if r.id == subpart.parent_id)
    page.hover_at(*_click_point(regions, subpart))
    page.wait(lambda: page.find(f'#overlay path[data-key="{subpart.id}"]').get_attribute("class").endswith("hover"),
              "the hover highlight")
    info = page.find("#hover-info").text
    assert f"subpart #{subpart.id} · score {subpart.score:.3f}" in info
    assert f"whole #{part.parent_id} › part #{part.id} › subpart #{subpart.id}" in info
    page.screenshot("hover_subpart")

    # The browser filtered to images holding subparts lists just those.
    from selenium.webdriver.support.ui import Select

    Select(page.find("#browse-level")).select_by_value("subpart")
    holding = {r.image_id for r in catalog.regions(catalog.region_ids(2))}
    page.wait(lambda: page.find("#total").text.endswith("subparts"), "the filtered list")
    page.wait(lambda: {int(a.get_attribute("data-id")) for a in page.find_all("#browse a")} == holding,
              "the images holding subparts")
    assert page.find("#total").text == f"{len(holding)} holding subparts"


def test_the_slider_outlines_only_the_best_scored_regions_and_always_the_selected_one(page, catalog):
    from selenium.webdriver.common.keys import Keys

    image = max(catalog.indexed_images(0, 8)[1], key=lambda i: i.n_regions)
    regions = catalog.regions_of_image(image.id)
    ranked = [str(r.id) for r in sorted(regions, key=lambda r: (-r.score, -r.area))]
    page.driver.get(f"{page.url}#image={image.id}")
    page.wait_view(f"/api/images/{image.id}?")
    assert page.visible() == set(ranked) and page.find("#best-count").text == str(len(ranked))

    slider = page.find("#best")
    slider.send_keys(Keys.HOME, Keys.RIGHT, Keys.RIGHT, Keys.RIGHT)
    assert page.find("#best-count").text == "3" and page.visible() == set(ranked[:3])
    page.screenshot("best_3")

    # A region beyond the best three, selected through a link, is outlined with them; the choice stays.
    page.driver.get(f"{page.url}#region={ranked[-1]}")
    page.wait(lambda: page.find("#selected-info").get_attribute("data-key") == ranked[-1], "the linked region")
    assert page.visible() == set(ranked[:3]) | {ranked[-1]}
    page.find("body").send_keys(Keys.ESCAPE)
    assert page.visible() == set(ranked[:3])

    page.find("#best").send_keys(Keys.END)
    assert page.visible() == set(ranked)
    other = next(i for i in catalog.indexed_images(0, 8)[1] if i.id != image.id)
    page.driver.get(f"{page.url}#image={other.id}")
    page.wait_view(f"/api/images/{other.id}?")
    assert page.visible() == {str(r.id) for r in catalog.regions_of_image(other.id)}


def test_clicking_a_part_searches_for_it_and_walks_up_the_hierarchy(page, catalog):
    image = catalog.indexed_images(5, 1)[1][0]
    regions = catalog.regions_of_image(image.id)
    part = next(r for r in regions if r.level == 1 and any(c.parent_id == r.id for c in regions))
    page.driver.get(f"{page.url}#image={image.id}")
    page.wait_view(f"/api/images/{image.id}?")

    # Dragging still draws a query box (in original pixels, whatever the view's scale).
    from selenium.webdriver.common.action_chains import ActionChains

    x0, y0, x1, y1 = part.box
    drag = page.point_at(x0, y0, ActionChains(page.driver)).click_and_hold()
    page.point_at(x1, y1, drag).release().perform()
    drawn = page.driver.execute_script("return box")
    assert np.allclose(drawn, part.box, atol=2.5) and page.find("#draw").is_displayed()
    boxed = page.search_then(lambda: page.find("#go").click())
    assert boxed[0][0] == image.id
    page.screenshot("box_drawn_results")
    page.find("#clear").click()
    assert page.driver.execute_script("return box") is None and not page.find("#draw").is_displayed()

    found = page.search_then(lambda: page.click_at(*_click_point(regions, part)))
    assert found[0] == (image.id, part.id)  # the part itself, in its own image, comes first
    assert page.find("#selected-info").get_attribute("data-key") == str(part.id)
    first = page.find("#results figure path.region")
    assert first.get_attribute("d") == page.outline_d(str(part.id)) and first.get_attribute("class") == "region part"
    assert len(found) == 8 and len({i for i, _ in found}) == 8
    page.screenshot("part_clicked_results")

    # p: to its parent, which lists its children; c: back down to the first child.
    page.find("body").send_keys("p")
    page.wait(lambda: page.find("#selected-info").get_attribute("data-key") == str(part.parent_id), "the parent")
    children = [a.get_attribute("data-key") for a in page.find_all("#selected-info a") if a.get_attribute("id") != "to-parent"]
    assert children == [str(r.id) for r in catalog.children(part.parent_id)] and str(part.id) in children
    assert page.find_all("#to-parent") == []  # a whole is a root
    assert "selected" in page.find(f'#overlay path[data-key="{part.parent_id}"]').get_attribute("class")
    page.screenshot("parent_selected")
    page.find("body").send_keys("c")
    page.wait(lambda: page.find("#selected-info").get_attribute("data-key") == children[0], "the first child")
    child = catalog.regions([int(children[0])])[0]
    grandchildren = [r.id for r in catalog.children(child.id)]
    if grandchildren:  # down to a subpart, then up again through the parent link
        page.find("body").send_keys("c")
        page.wait(lambda: page.find("#selected-info").get_attribute("data-key") == str(grandchildren[0]), "a subpart")
        page.find("#to-parent").click()
        page.wait(lambda: page.find("#selected-info").get_attribute("data-key") == str(child.id), "back up")

    # A result's link opens its image in the view with the matched region selected.
    second_image, second_region = found[1]
    page.find_all("#results figure a.open")[1].click()
    page.wait_view(f"/api/images/{second_image}?")
    page.wait(lambda: page.find("#selected-info").get_attribute("data-key") == str(second_region), "the result region")
    assert page.visible() == {str(r.id) for r in catalog.regions_of_image(second_image)}
    page.screenshot("result_opened")


def test_an_uploaded_images_regions_are_found_and_searched(page, catalog, scenes_index):
    folder, _ = scenes_index
    photo = folder / "scene_05.png"
    page.find("#file").send_keys(str(photo))
    page.wait_view("blob:")
    page.screenshot("upload_regions")
    found = _post_json(page.url + "api/regions", {}, {"image": photo})["regions"]  # the same discovery again
    assert len(page.visible()) == len(found) > 0
    assert sorted(p.get_attribute("d") for p in page.find_all("#overlay path.region")) == sorted(
        "".join("M" + "L".join(f"{x:g} {y:g}" for x, y in ring) + "Z" for ring in r["outline"]) for r in found)

    # Click the largest region found that holds some of the view alone (smaller ones can tile a larger one).
    size = (page.driver.execute_script("return view.height"), page.driver.execute_script("return view.width"))
    masks = [polygon_mask(r["outline"], size) for r in found]
    for target in np.argsort([-r["area"] for r in found], kind="stable").tolist():
        free = _free_area(masks[target], [m for m, r in zip(masks, found) if r["area"] < found[target]["area"]])
        if free.max() >= 3:
            break
    point = _inner_point(masks[target], [m for m, r in zip(masks, found) if r["area"] < found[target]["area"]])
    results = page.search_then(lambda: page.click_at(*point))
    handle = page.find("#selected-info").get_attribute("data-key")
    assert re.fullmatch(r"[0-9a-f]{16}\.\d+", handle) and int(handle.split(".")[1]) == target
    expected = _post_json(page.url + "api/search", {"region": handle, "k": "10"})["results"]
    assert results == [(r["image_id"], r["region_id"]) for r in expected]
    assert Path(expected[0]["path"]).name == "scene_05.png"  # the same picture is in the index
    page.screenshot("upload_region_results")
