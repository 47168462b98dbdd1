"""`gsv3d app` in a real headless Chromium: the page loads, an uploaded toy image comes back as the preprocessed
input, orbit, turntable, mesh + Gaussians viewers and download links; a corrupt upload shows predict's message.

The model is a tiny distill config with a random stage-1 decoder, built here (as tests/test_predict.py's demo);
the app runs in a subprocess on a free localhost port, driven by selenium with the system chromium and
chromedriver (Debian: ``apt-get install chromium chromium-driver``; .ci/run installs them). It saves a
screenshot under the test's tmp folder; ``GSV3D_SCREENSHOT=docs/images/app.png pytest tests/test_app_browser.py``
refreshes the README's (a test run never rewrites a tracked file on its own).
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

from tests.app_server import free_port, serving
from tests.images import write_rgba

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                       reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian: apt-get install chromium chromium-driver)"),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> dict:
    """configs/distill/tiny.yaml + an overlay pointing at a random stage-1 decoder checkpoint (no LoRA ckpt
    needed: the app, as predict, runs SV3D without one) and a LoRA checkpoint of that stage."""
    import torch
    import yaml

    from gsv3d_pl.tools.predict import load_stage

    tmp = tmp_path_factory.mktemp("app_model")
    dec_stage, _ = load_stage([str(ROOT / "configs" / "decoder" / "tiny.yaml")])
    ckpt = {"state_dict": dec_stage.state_dict()}
    dec_stage.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp / "decoder.ckpt")
    overlay = {"trainer": {"default_root_dir": str(tmp / "run"), "logger": False},
               "model": {"init_args": {"decoder_ckpt": str(tmp / "decoder.ckpt")}},
               "data": {"init_args": {"cache_dir": str(tmp / "cache")}}}
    (tmp / "overlay.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
    configs = [str(ROOT / "configs" / "distill" / "tiny.yaml"), str(tmp / "overlay.yaml")]
    stage, _ = load_stage(configs)
    ckpt = {"state_dict": stage.state_dict()}
    stage.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp / "distill.ckpt")
    return {"tmp": tmp, "configs": configs, "ckpt": tmp / "distill.ckpt"}


@pytest.fixture(scope="module")
def app_url(tiny_model):
    tmp, port = tiny_model["tmp"], free_port()
    cmd = [sys.executable, "-m", "gsv3d_pl", "app", *sum((["--config", c] for c in tiny_model["configs"]), []),
           "--ckpt_path", str(tiny_model["ckpt"]), "--host", "127.0.0.1", "--port", str(port),
           "--outputs", str(tmp / "outputs"), "--num_steps", "2", "--turntable_frames", "8", "--render_size", "64",
           "--mesh-resolution", "64", "--mesh-texture-size", "256", "--mesh-bake-size", "128",
           "--mesh-bake-views", "8"]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
    with serving(cmd, port, tmp / "app.log", ROOT, env, timeout=60):
        yield f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500",
              "--enable-unsafe-swiftshader", "--use-angle=swiftshader"):  # software WebGL for the 3D viewers
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, what, timeout: float, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: what(d), message=message)


def _upload(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By

    for b in driver.find_elements(By.CSS_SELECTOR, "#upload button[aria-label='Clear']"):
        b.click()  # the previous file
    box = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"), 10,
                "no file input in #upload")[0]
    box.send_keys(str(path))
    _wait(driver, lambda d: path.name in _text(d, "upload"), 15, f"{path.name} not uploaded")


def _text(driver, elem_id: str) -> str:
    """An element's text; gradio shows a file's stem and suffix on separate lines."""
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, elem_id).text.replace("\n", "")


def test_app_upload_results_and_bad_image(app_url, browser, tmp_path):
    from selenium.webdriver.common.by import By

    from gsv3d_pl.inference import ImageInputError, preprocess_image

    d = browser
    d.get(app_url)
    _wait(d, lambda d: d.find_elements(By.ID, "generate"), 30, "the page did not load")
    assert "GSV3D" in d.title

    # 1. A good image: every output shows up.
    img = write_rgba(tmp_path / "toy.png")
    _upload(d, img)
    d.find_element(By.ID, "generate").click()
    _wait(d, lambda d: "Gaussians" in d.find_element(By.ID, "status").text, 60,
          "no result within 60 s")
    status = d.find_element(By.ID, "status").text
    assert re.search(r"[\d,]+ Gaussians in [\d.]+s", status), status

    for elem in ("preprocessed", "views"):
        _wait(d, lambda d, e=elem: d.find_elements(By.CSS_SELECTOR, f"#{e} img[src]"), 10, f"no image in #{elem}")
    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#turntable video[src], #turntable img[src]"), 10,
          "no turntable")
    for viewer, suffix in (("viewer-mesh", ".glb"), ("viewer-gaussians", ".ply")):
        _wait(d, lambda d, v=viewer: d.find_elements(By.CSS_SELECTOR, f"#{v} canvas"), 15, f"no canvas in #{viewer}")
        link = d.find_element(By.CSS_SELECTOR, f"#{viewer} a[data-testid='model3d-download-link']")
        assert link.get_attribute("href").split("?")[0].endswith(suffix), link.get_attribute("href")
    downloads = d.find_element(By.ID, "downloads")
    names = _text(d, "downloads")
    for name in ("gaussians.ply", "mesh.glb", "turntable.mp4", "views.png"):
        assert name in names, f"{name} not among the downloads: {names!r}"
    hrefs = [a.get_attribute("href") for a in downloads.find_elements(By.CSS_SELECTOR, "a[href]")]
    assert len(hrefs) >= 4 and all(h.startswith(app_url) for h in hrefs), hrefs
    time.sleep(1.5)  # let the 3D viewers draw
    d.execute_script("window.scrollTo(0, 0)")
    shot = Path(os.environ.get("GSV3D_SCREENSHOT") or tmp_path / "app.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    # 2. A corrupt file: predict's message, as an error toast; the previous result stays.
    bad = tmp_path / "corrupt.png"
    data = img.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated PNG
    with pytest.raises(ImageInputError) as exc:
        preprocess_image(bad, 64, name=bad.name)
    expected = str(exc.value)
    assert "corrupt or truncated" in expected
    _upload(d, bad)
    d.find_element(By.ID, "generate").click()
    _wait(d, lambda d: expected in d.find_element(By.TAG_NAME, "body").text, 20,
          f"the error {expected!r} was not shown")
    assert "gaussians.ply" in _text(d, "downloads")
