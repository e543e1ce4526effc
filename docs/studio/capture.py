"""Takes the screenshots of docs/studio/ (the README's "Drawing shots"): starts `mpp studio` on a
trained toy checkpoint and a cast folder, draws a 16:9 shot of two boxes in headless chromium, gives
the first a cast photo, and captures the page before and after generating.

    python docs/studio/capture.py --ckpt_path .cache/bench/toy_annotate/truth/final.ckpt \\
        --cast .cache/bench/toy_annotate/cast [--character orange_striped_square] [-- overrides of mpp studio]

The browser flow is the browser test's (`tests/studio/test_browser.py`), on a model that draws.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from tests.studio.test_browser import CHROMIUM, CHROMIUM_ARGS, _draw, _free_port, _status  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--cast", required=True)
    p.add_argument("--character", default="orange_striped_square", help="the cast member given to the first box")
    p.add_argument("--prompt", default="an orange striped square beside a grey block")
    p.add_argument("--captions", nargs=2, default=["an orange striped square", "a grey block"])
    p.add_argument("--to", default=os.path.dirname(os.path.abspath(__file__)))
    a, overrides = p.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    out, port = tempfile.mkdtemp(prefix="mpp_studio_"), _free_port()
    cmd = [sys.executable, "-m", "mpp", "studio", "--config", "configs/stage1.yaml", "--config", "configs/toy.yaml",
           "--ckpt_path", a.ckpt_path, "--cast", a.cast, "--out", out, "--port", str(port), *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}/"
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError as e:
                if proc.poll() is not None:
                    raise SystemExit("mpp studio stopped") from e
                time.sleep(0.5)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1400})
            page.set_default_timeout(120_000)
            page.goto(url, wait_until="load")
            page.wait_for_selector("#generate")
            page.get_by_role("combobox", name="frame").click()
            page.get_by_role("option", name="16:9  176×96").click()
            page.locator("#new-frame").click()
            _status(page, "frame 176×96")
            _draw(page, (0.14, 0.12), (0.40, 0.80), a.captions[0])
            _draw(page, (0.52, 0.30), (0.80, 0.85), a.captions[1])
            page.locator("#box-pick input").fill("1")
            names = sorted(os.listdir(a.cast))
            index = names.index(a.character) if a.character else 0
            page.locator("#cast .thumbnail-item").nth(2 * index).click()  # two photos per toy character
            _status(page, "box 1: reference")
            page.locator("#prompt textarea").fill(a.prompt)
            page.locator("#variations input[type=number]").fill("4")
            page.screenshot(path=os.path.join(a.to, "studio_before.png"), full_page=True)
            page.locator("#generate").click()
            print(_status(page, "(seed"))
            page.locator("#strip img").first.wait_for()
            page.screenshot(path=os.path.join(a.to, "studio_generated.png"), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
