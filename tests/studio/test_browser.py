"""`mpp studio` in a real browser: headless Debian chromium driven by Playwright draws a shot, gives a
box a cast member's photo, generates, keeps a shot list that `mpp generate` renders to the same
pixels, and shows bad input as a message in the page.

Run with `python -m pytest -m browser` (`.ci/run` installs chromium). Set MPP_STUDIO_SCREENSHOTS to
a folder to keep the screenshots (docs/studio/ holds the ones the README shows)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import expect, sync_playwright

from mpp.__main__ import main as mpp_main
from tests.helpers import ROOT, train_toy_checkpoint

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
# a closed network: no background connections, no first-run (as env's notes on this machine say)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, toy_models, toy_prepared, toy_world):
    """`mpp studio` on a 2-step toy checkpoint with a cast folder, as a user starts it."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (as .ci/run does)")
    root = tmp_path_factory.mktemp("studio_browser")
    ckpt, args = train_toy_checkpoint(root, toy_models, toy_prepared)
    (root / "other").mkdir()  # a checkpoint of another model: a coarser modulation grid
    other, _ = train_toy_checkpoint(root / "other", toy_models, toy_prepared, "--model.heads.modulation_grid=2",
                                    steps=1)
    flags = [a for a in args[1:] if not a.startswith("--trainer.max_steps")]
    for ident in toy_world.identities[:2]:  # one folder per character, as `mpp annotate --cast` reads
        (root / "cast" / ident.name).mkdir(parents=True)
        Image.fromarray(toy_world.reference(ident.name)).save(root / "cast" / ident.name / "front.png")
    port, out = _free_port(), root / "out"
    log = open(root / "studio.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mpp", "studio", *flags, "--ckpt_path", ckpt, "--cast",
                             str(root / "cast"), "--out", str(out), "--port", str(port)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mpp studio did not start:\n{(root / 'studio.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield {"url": url, "out": out, "ckpt": ckpt, "flags": flags, "root": root,
           "other": other}
    proc.terminate()
    proc.wait(30)
    log.close()


@pytest.fixture
def page(served):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1400})
        page.set_default_timeout(60_000)
        page.goto(served["url"], wait_until="load")
        page.wait_for_selector("#generate")
        yield page
        browser.close()


def _snap(page, name: str, tmp_path) -> None:
    folder = os.environ.get("MPP_STUDIO_SCREENSHOTS") or str(tmp_path)
    os.makedirs(folder, exist_ok=True)
    page.screenshot(path=os.path.join(folder, name), full_page=True)


def _status(page, expected: str) -> str:
    """The status line once it says `expected` (on a timeout: what it said, and a screenshot)."""
    try:
        page.locator("#status").filter(has_text=expected).wait_for(timeout=60_000)
    except Exception as e:
        page.screenshot(path="/tmp/studio_failure.png", full_page=True)
        raise AssertionError(f"the page never said {expected!r}; it says {page.locator('#status').inner_text()!r} "
                             "(screenshot: /tmp/studio_failure.png)") from e
    return page.locator("#status").inner_text()


def _fill(field, text: str) -> None:
    """Types `text` into a field once it is on screen and shows it (an accordion mounts its fields as
    it opens: a value typed before that is lost)."""
    field.wait_for(state="visible")
    field.fill(text)
    expect(field).to_have_value(text)


def _draw(page, frac0, frac1, caption: str) -> None:
    """Drags a box on the canvas from one fraction of its size to another, then types its caption.
    The canvas takes a new frame's image after the status line reports it; a drag before the image
    is in draws nothing, so one with no caption dialog after 10 s is dragged again (twice at most)."""
    label = page.get_by_role("listbox", name="Label")
    for attempt in range(3):
        canvas = page.locator("#canvas canvas").bounding_box()
        x0, y0 = canvas["x"] + frac0[0] * canvas["width"], canvas["y"] + frac0[1] * canvas["height"]
        x1, y1 = canvas["x"] + frac1[0] * canvas["width"], canvas["y"] + frac1[1] * canvas["height"]
        page.mouse.move(x0, y0)
        page.mouse.down()
        page.mouse.move(x1, y1, steps=10)
        page.mouse.up()
        try:
            label.wait_for(timeout=10_000)
            break
        except PlaywrightTimeout:
            if attempt == 2:
                raise
    label.fill(caption)
    page.get_by_role("button", name="OK").click()
    label.wait_for(state="hidden")


def _rows(page, table: str) -> list[list[str]]:
    """The body rows of a Dataframe, as text (Gradio draws it as a grid of gridcells)."""
    rows = [[c.inner_text().strip() for c in row.locator("[role=gridcell]").all()]
            for row in page.locator(f"#{table} [role=row]").all()]
    return [r for r in rows if r and any(r)]


def test_draw_generate_and_keep_a_shot_list(page, served, tmp_path):
    out = served["out"]
    page.get_by_role("combobox", name="frame").click()
    page.get_by_role("option", name="16:9  176×96").click()
    page.locator("#new-frame").click()
    assert "frame 176×96" in _status(page, "frame 176×96")
    _draw(page, (0.08, 0.10), (0.40, 0.90), "a red striped square")
    _draw(page, (0.55, 0.20), (0.95, 0.80), "a grey block")
    page.locator("#boxes [role=gridcell]").filter(has_text="a grey block").wait_for()
    # box 1 gets the first cast photo: a foreground instance
    page.locator("#box-pick input").fill("1")
    page.locator("#cast .thumbnail-item").first.click()
    assert "box 1: reference front-" in _status(page, "box 1: reference")
    rows = _rows(page, "boxes")
    assert [r[3] for r in rows] == ["foreground", "background"] and rows[0][1] == "a red striped square"
    page.locator("#prompt textarea").fill("a red striped square beside a grey block")
    page.locator("#seed input").fill("3")
    page.locator("#steps input").fill("2")
    _snap(page, "studio_before.png", tmp_path)
    page.locator("#generate").click()
    assert "shot_001: shot_001.png (seed 3" in _status(page, "shot_001.png")
    page.locator("#generated img").wait_for()
    _snap(page, "studio_generated.png", tmp_path)
    assert [r[4] != "" for r in _rows(page, "boxes")] == [True, True]  # α per box, after generation

    page.locator("#add-shot").click()
    _status(page, "shot_001 added")
    page.locator("#duplicate-shot").click()
    _status(page, "duplicated as shot_001_2")
    page.locator("#move-down").click()
    _status(page, "shot_001 is #2")
    assert [r[1] for r in _rows(page, "shot-list")] == ["shot_001_2", "shot_001"]
    page.locator("#save-list").click()
    _status(page, "saved 2 shots")
    _snap(page, "studio_shot_list.png", tmp_path)

    lines = [json.loads(x) for x in (out / "shots.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ["shot_001_2", "shot_001"]
    first = lines[1]
    assert (first["width"], first["height"], first["seed"], first["sampling"]["steps"]) == (176, 96, 3, 2)
    assert first["instances"][0]["reference"].startswith("references/front-")
    assert "reference" not in first["instances"][1] and first["instances"][1]["caption"] == "a grey block"
    left, right = (inst["bbox"] for inst in first["instances"])  # where they were drawn: side by side
    assert 0 <= left[0] < left[2] < right[0] < right[2] <= 1 and right[2] - right[0] > 0.2

    # reloaded: the list, and a shot opened back into the editor
    page.locator("#remove-shot").click()
    _status(page, "removed shot_001")
    page.locator("#load-list").click()
    assert "loaded 2 shots" in _status(page, "loaded 2 shots")
    assert [r[1] for r in _rows(page, "shot-list")] == ["shot_001_2", "shot_001"]
    page.locator("#shot-pick input").fill("2")
    page.locator("#open-shot").click()
    _status(page, "opened shot_001")
    assert page.locator("#prompt textarea").input_value() == "a red striped square beside a grey block"
    assert page.locator("#width input").input_value() == "176"
    assert [r[3] for r in _rows(page, "boxes")] == ["foreground", "background"]

    # the saved list, batch-rendered: the app's pixels
    flags = served["flags"]
    configs = [flags[i + 1] for i, a in enumerate(flags) if a == "--config"]
    overrides = [a for a in flags if a.startswith("--") and a != "--config" and "=" in a]
    cli = tmp_path / "cli"
    assert mpp_main(["generate", *[x for c in configs for x in ("--config", c)], "--ckpt_path", served["ckpt"],
                     "--layouts", str(out / "shots.jsonl"), "--out", str(cli), *overrides]) == 0
    assert np.array_equal(np.asarray(Image.open(cli / "shot_001.png")), np.asarray(Image.open(out / "shot_001.png")))
    # nothing outside the output folder; Gradio's own files are under it too
    top = set(os.listdir(out))
    assert top <= {"shots.jsonl", "generated.json", "shot_001.png", "shot_001_boxes.png", "references", ".gradio"}


def test_bad_input_is_a_message_in_the_page(page, served, tmp_path):
    page.get_by_role("combobox", name="frame").click()
    page.get_by_role("option", name="custom size").click()
    page.locator("#width input").fill("180")
    page.locator("#new-frame").click()
    assert "the frame 180×128 must be a positive multiple of 16" in _status(page, "multiple of 16")
    page.locator("#generate").click()  # no box drawn
    assert "draw at least one box" in _status(page, "draw at least one box")
    page.locator("#box-pick input").fill("3")
    page.locator("#cast .thumbnail-item").first.click()
    assert "box #3: the frame has 0 boxes" in _status(page, "box #3")
    page.locator("#load-path textarea, #load-path input").first.fill(str(tmp_path / "nowhere.jsonl"))
    page.locator("#load-list").click()
    assert "cannot read the shot list" in _status(page, "cannot read the shot list")
    # a checkpoint of another model, then a file that is no checkpoint: named, the model kept
    page.get_by_text("model", exact=True).click()
    _fill(page.locator("#ckpt textarea, #ckpt input").first, served["other"])
    page.locator("#load-ckpt").click()
    assert "modulation_grid=2 (this run: 8)" in _status(page, "modulation_grid")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    _fill(page.locator("#ckpt textarea, #ckpt input").first, str(tmp_path / "junk.ckpt"))
    page.locator("#load-ckpt").click()
    text = _status(page, "junk.ckpt")
    assert text.startswith("Error:") and "Traceback" not in page.content()
    _snap(page, "studio_bad_input.png", tmp_path)
