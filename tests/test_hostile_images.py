"""Hostile image inputs and the app's limits (issue: hardening, part 2 "bounded preprocessing").

- A small file that declares a huge or absurdly shaped image is refused from its header, with the file named,
  before any model is built; Pillow's decompression-bomb warning and error become the same refusal.
- A large but reasonable image is preprocessed with memory bounded by the output size, and gives the output
  of a small copy of itself. The memory is measured as the peak RSS of a subprocess, which is killed as soon
  as it passes the cap (so a regression fails fast instead of eating the machine).
- ``gsv3d app``: 127.0.0.1 and no share link by default, ``--auth``/``--auth-file``, an upload limit the server
  enforces (413), a bounded queue, cache clean-up, and ``/etc/passwd`` still refused through the file route.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gsv3d_pl.inference import ImageInputError, preprocess_image
from gsv3d_pl.inference import preprocess as pp
from gsv3d_pl.tools import predict as predict_tool
from tests.app_server import free_port, serving
from tests.images import write_rgb_white, write_rgba

ROOT = Path(__file__).resolve().parents[1]
CAP = 2 * 1024**3  # bytes of RSS; before the fix: 9.8 GB (20000x64 strip), 4.3 GB (8000x8000 PNG)


# ------------------------------------------------------------------------------------------------ helpers

def _chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)


def write_disc_png(path: Path, w: int, h: int, cy: int, cx: int, r: int, color=(200, 40, 30)) -> Path:
    """A w x h RGBA PNG, transparent but for an opaque disc, streamed a row at a time (an 8000 x 8000 image is a
    few hundred KB on disk and never whole in this process's memory)."""
    comp, parts = zlib.compressobj(6), []
    empty, xs = b"\x00" * (4 * w + 1), np.arange(w)
    for y in range(h):
        if abs(y - cy) < r:
            row = np.zeros((w, 4), np.uint8)
            row[(xs - cx) ** 2 + (y - cy) ** 2 < r**2] = (*color, 255)
            parts.append(comp.compress(b"\x00" + row.tobytes()))
        else:
            parts.append(comp.compress(empty))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts))
                     + _chunk(b"IEND", b""))
    return path


def write_header_only_png(path: Path, w: int, h: int) -> Path:
    """A PNG whose header declares w x h RGBA and whose data is a few bytes: decoding it would fail (or, with
    real data, allocate 4 w h bytes); the size checks must refuse it from the header alone."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + _chunk(b"IEND", b""))
    return path


def write_strip(path: Path, w: int = 20000, h: int = 64) -> Path:
    """The probe's 20000 x 64 RGBA PNG (~5 KB): an opaque bar across the whole width."""
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[h // 4: 3 * h // 4, 100:-100] = (30, 60, 200, 255)
    Image.fromarray(rgba).save(path)
    return path


def run_capped(cmd: list[str], cap: int = CAP, timeout: float = 180, **kw) -> tuple[int, int, str]:
    """Run ``cmd``; return (exit status, peak RSS in bytes, stdout + stderr). The child is killed when its peak
    RSS (VmHWM) passes ``cap``; the final peak is the kernel's own count (wait4's ru_maxrss)."""
    out = kw.pop("log")
    with open(out, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kw)
        deadline, peak = time.monotonic() + timeout, 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                peak = max(peak, usage.ru_maxrss * 1024)
                break
            try:
                hwm = next(ln for ln in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                           if ln.startswith("VmHWM:"))
                peak = max(peak, int(hwm.split()[1]) * 1024)
            except (OSError, StopIteration):
                pass
            if peak > cap or time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.02)
    return proc.returncode, peak, Path(out).read_text()


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


# ------------------------------------------------------------------------------------------------ refusals

def test_strip_through_predict_is_refused_before_the_model_under_the_memory_cap(tmp_path):
    """The probe's 20000 x 64 PNG (312:1): one line naming the file, exit 1 (an input failed), well under 2 GB,
    before the model (the config named does not even exist: loading it would exit 2 with its own message)."""
    strip = write_strip(tmp_path / "strip.png")
    assert strip.stat().st_size < 30_000
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gsv3d_pl", "predict", "--config", str(tmp_path / "never-read.yaml"),
           "--image", str(strip), "--out", str(out), "--quiet"]
    rc, peak, log = run_capped(cmd, log=tmp_path / "log.txt", cwd=ROOT, env=_env())
    assert peak < CAP, f"peak RSS {peak / 2**30:.2f} GB >= the 2 GB cap:\n{log[-2000:]}"
    assert rc == 1, log
    errors = [ln for ln in log.splitlines() if ln.startswith("error:") and "strip.png" in ln]
    assert len(errors) == 1 and "aspect ratio of 312:1" in errors[0] and "at most 20:1" in errors[0], log
    assert "never-read.yaml" not in log and "Traceback" not in log
    assert not out.exists()


def test_large_image_is_bounded_and_matches_a_small_copy(tmp_path):
    """An 8000 x 8000 RGBA PNG (64 MP, allowed) is preprocessed under the cap; its output is that of the same
    scene at 1000 x 1000 (within resampling), and a small object in it gives exactly the output of the same
    pixels cropped to a small image (pass 2 takes its region at full resolution)."""
    big = write_disc_png(tmp_path / "big.png", 8000, 8000, 3000, 4504, 1504)
    dot = write_disc_png(tmp_path / "dot.png", 8000, 8000, 5000, 2000, 100)
    script = ("import sys, torch\nfrom gsv3d_pl.inference import preprocess_image\n"
              "torch.save([preprocess_image(p, 64) for p in sys.argv[2:]], sys.argv[1])\n")
    res = tmp_path / "res.pt"
    rc, peak, log = run_capped([sys.executable, "-c", script, str(res), str(big), str(dot)],
                               log=tmp_path / "log.txt", cwd=ROOT, env=_env())
    assert peak < CAP, f"peak RSS {peak / 2**30:.2f} GB >= the 2 GB cap:\n{log[-2000:]}"
    assert rc == 0, log
    (big_img, big_alpha), (dot_img, dot_alpha) = torch.load(res)

    small_img, small_alpha = preprocess_image(write_disc_png(tmp_path / "small.png", 1000, 1000, 375, 563, 188), 64)
    assert (big_alpha - small_alpha).abs().mean() < 0.01 and (big_img - small_img).abs().mean() < 0.01
    assert (big_alpha - small_alpha).abs().max() < 0.25
    crop_img, crop_alpha = preprocess_image(write_disc_png(tmp_path / "crop.png", 1000, 900, 500, 500, 100), 64)
    assert torch.allclose(dot_img, crop_img, atol=1e-6) and torch.allclose(dot_alpha, crop_alpha, atol=1e-6)


@pytest.mark.parametrize("kind", ["rgba", "white_png", "white_jpg_rotated"])
def test_bounded_path_matches_the_direct_one(kind, tmp_path, monkeypatch):
    """With the working size lowered, a 1200 x 1000 image takes the bounded path: pass 2 (a small object) gives
    the direct path's output exactly, pass 1 (a larger output) within resampling. JPEG: decoded by draft,
    EXIF-rotated."""
    yy, xx = np.mgrid[:1000, :1200]
    m = (yy - 300) ** 2 + (xx - 700) ** 2 < 60**2
    m |= (np.abs(yy - 300) < 8) & (np.abs(xx - 620) < 40)  # a handle: the object is not symmetric
    path = tmp_path / ("a.jpg" if kind.endswith("jpg_rotated") else "a.png")
    if kind == "rgba":
        rgba = np.zeros((1000, 1200, 4), np.uint8)
        rgba[m] = (200, 40, 30, 255)
        Image.fromarray(rgba).save(path)
    else:
        rgb = np.full((1000, 1200, 3), 255, np.uint8)
        rgb[m] = (30, 60, 200)
        im = Image.fromarray(rgb)
        if kind == "white_png":
            im.save(path)
        else:
            exif = im.getexif()
            exif[0x0112] = 6  # rotated 90°: the region is found in the oriented image
            im.save(path, exif=exif, quality=95)
    direct = {s: preprocess_image(path, s) for s in (64, 16)}
    monkeypatch.setattr(pp, "WORKING_SIZE", 200)
    got = preprocess_image(path, 64)  # pass 1 finds a ~40 px crop: pass 2 at full resolution
    assert torch.equal(got[0], direct[64][0]) and torch.equal(got[1], direct[64][1])
    got = preprocess_image(path, 16)  # pass 1's crop is >= 2x the output: used as it is
    assert (got[1] - direct[16][1]).abs().mean() < 0.02 and (got[0] - direct[16][0]).abs().mean() < 0.02


def test_decompression_bombs_are_refused_from_the_header(tmp_path, monkeypatch, capsys):
    """Headers over the pixel limit are refused before decoding (the data here is a few bytes: a decode would
    report a truncated file instead), over Pillow's limit too (its DecompressionBombError), and with Pillow's
    limit lowered its warning becomes the same refusal, through predict as well."""
    over_ours = write_header_only_png(tmp_path / "85mp.png", 9000, 9500)  # under Pillow's 89.5 MP warning
    over_pillow = write_header_only_png(tmp_path / "900mp.png", 30000, 30000)  # over Pillow's 2x: its error
    for path in (over_ours, over_pillow):
        with pytest.raises(ImageInputError) as exc:
            preprocess_image(path, 64)
        assert str(exc.value).startswith(str(path)) and "decompression bomb" in str(exc.value)
        assert "downscale it" in str(exc.value)
    with pytest.raises(ImageInputError, match="aspect ratio of 312:1"):  # a header-only strip: no decode
        preprocess_image(write_header_only_png(tmp_path / "strip.png", 20000, 64), 64)

    img = write_rgba(tmp_path / "a.png")  # 160 x 160 = 25600 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)  # Pillow would only warn (under 2x its limit)
    with pytest.raises(ImageInputError) as exc:
        preprocess_image(img, 64)
    assert str(img) in str(exc.value) and "decompression bomb" in str(exc.value)
    with pytest.raises(ImageInputError, match="decompression bomb"):
        preprocess_image(Image.new("RGBA", (160, 160)), 64)  # an image object: the same rule
    code = predict_tool.main(["--config", str(tmp_path / "never-read.yaml"), "--image", str(img), "--out",
                              str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and str(img) in err and "decompression bomb" in err and not (tmp_path / "o").exists()


def test_small_foreground_ratio_keeps_the_canvas_bounded(tmp_path):
    """--foreground_ratio 0.05 on a 2000 x 2000 full-frame object: the canvas would be 40000 px square (26 GB
    of floats); the working copy is shrunk first, under the cap, and the object spans 5 % of the frame."""
    rgba = np.zeros((2000, 2000, 4), np.uint8)
    rgba[:, :] = (10, 200, 30, 255)
    rgba[0, 0, 3] = 0  # not all opaque: the alpha channel is used
    Image.fromarray(rgba).save(tmp_path / "full.png")
    script = ("import sys, torch\nfrom gsv3d_pl.inference import preprocess_image\n"
              "torch.save(preprocess_image(sys.argv[2], 64, foreground_ratio=0.05), sys.argv[1])\n")
    rc, peak, log = run_capped([sys.executable, "-c", script, str(tmp_path / "res.pt"), str(tmp_path / "full.png")],
                               log=tmp_path / "log.txt", cwd=ROOT, env=_env())
    assert peak < CAP and rc == 0, f"rc {rc}, peak RSS {peak / 2**30:.2f} GB:\n{log[-2000:]}"
    img, alpha = torch.load(tmp_path / "res.pt")
    assert img.shape == (3, 64, 64) and 2.5 <= float(alpha.sum()) ** 0.5 <= 4.0  # ~3.2 px of 64 on a side


# ------------------------------------------------------------------------------------------------ the app

def test_app_upload_uses_the_bounded_path(tmp_path):
    from gsv3d_pl.app import AppRunner

    pipe = types.SimpleNamespace(num_steps=2, sv3d=None)
    runner = AppRunner(pipe, 64, tmp_path / "outputs")
    with pytest.raises(ImageInputError) as exc:
        runner.preprocess(write_strip(tmp_path / "upload.png"))
    assert str(exc.value).startswith("upload.png: ") and "aspect ratio" in str(exc.value)
    img, alpha = runner.preprocess(write_rgb_white(tmp_path / "ok.png"))
    assert img.shape == (3, 64, 64)


def test_app_auth_and_size_flags(tmp_path):
    from gsv3d_pl.tools.app import build_parser, parse_file_size, read_auth, serve_settings

    assert parse_file_size("10mb") == 10 * 2**20 and parse_file_size("500 KB") == 500 * 1024
    assert parse_file_size("4096") == 4096 and parse_file_size("1.5gb") == int(1.5 * 2**30)
    for bad in ("ten mb", "10tb", "0", "-1mb", ""):
        with pytest.raises(ValueError, match="--max-file-size"):
            parse_file_size(bad)

    users = tmp_path / "users.txt"
    users.write_text("# who may log in\nalice:s3cret:with:colons\n\n  bob:pw2\n")
    assert read_auth(["carol:pw3"], str(users)) == [("carol", "pw3"), ("alice", "s3cret:with:colons"),
                                                    ("bob", "pw2")]
    assert read_auth(None, None) is None
    for pairs, file, where in ((["nopass"], None, "--auth"), (["dave:"], None, "--auth"),
                               (None, str(tmp_path / "missing.txt"), "no such file")):
        with pytest.raises(ValueError, match=where):
            read_auth(pairs, file)
    bad = tmp_path / "bad.txt"
    bad.write_text("alice:topsecret\njustaname\n")
    with pytest.raises(ValueError) as exc:
        read_auth(None, str(bad))
    assert "line 2" in str(exc.value) and "topsecret" not in str(exc.value)
    (tmp_path / "empty.txt").write_text("# nobody\n")
    with pytest.raises(ValueError, match="no USER:PASS"):
        read_auth(None, str(tmp_path / "empty.txt"))

    args = build_parser().parse_args(["--config", "c.yaml"])
    assert args.host == "127.0.0.1"
    s = serve_settings(args)
    assert s.auth is None and s.max_file_size == 10 * 2**20 and s.queue_size >= 1 and s.delete_cache


def _stub_runner(outputs: Path):
    return types.SimpleNamespace(default_steps=2, mesh=None, video_format="gif", outputs=outputs,
                                 pipe=types.SimpleNamespace(device="cpu"))


def test_app_launch_is_configured(tmp_path, monkeypatch, capsys):
    """main() hands gradio the bind address, no share link, the logins, the upload limit, a bounded queue and
    the cache clean-up; a bad flag exits 2 before the model is built."""
    gr = pytest.importorskip("gradio")
    from gsv3d_pl.tools import app

    launched = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.append((self, kw)))
    built = []
    monkeypatch.setattr(app, "build_runner", lambda args: built.append(args) or _stub_runner(tmp_path))
    assert app.main(["--config", "c.yaml", "--auth", "u:p", "--max-file-size", "1mb", "--queue-size", "3"]) == 0
    (demo, kw), = launched
    assert kw["server_name"] == "127.0.0.1" and kw["share"] is False
    assert kw["auth"] == [("u", "p")] and kw["max_file_size"] == 2**20
    assert demo._queue.max_size == 3 and demo.delete_cache == (600, 3600)

    built.clear()
    for flags, message in ((["--auth", "nopass"], "--auth"), (["--max-file-size", "lots"], "--max-file-size"),
                           (["--queue-size", "0"], "--queue-size")):
        assert app.main(["--config", "c.yaml", *flags]) == 2
        assert message in capsys.readouterr().err and not built

    assert app.main(["--config", "c.yaml", "--host", "0.0.0.0"]) == 0  # open to the network without a login
    assert "without --auth" in capsys.readouterr().err


def _listen_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            local, state = ln.split()[1], ln.split()[3]
            addr, p = local.split(":")
            if int(p, 16) == port and state == "0A":  # LISTEN
                found.add(addr)
    return found


@pytest.mark.slow
def test_app_server_enforces_login_upload_limit_and_file_route(tmp_path):
    """A real server (the model stubbed out), default bind: it listens on 127.0.0.1 only; without a login the
    upload route is refused; logged in, an upload over --max-file-size gets 413 and a small one goes through;
    /etc/passwd is not served through the file route."""
    httpx = pytest.importorskip("httpx")
    users = tmp_path / "users.txt"
    users.write_text("alice:pw-alice\n")
    script = tmp_path / "serve.py"
    script.write_text(
        "import sys, types\nfrom pathlib import Path\nfrom gsv3d_pl.tools import app\n"
        "out = Path(sys.argv[1])\nout.mkdir(exist_ok=True)\n"
        "app.build_runner = lambda args: types.SimpleNamespace(default_steps=2, mesh=None, video_format='gif', "
        "outputs=out, pipe=types.SimpleNamespace(device='cpu'))\nsys.exit(app.main(sys.argv[2:]))\n")
    port = free_port()
    env = {**_env(), "GRADIO_TEMP_DIR": str(tmp_path / "gradio_tmp")}
    cmd = [sys.executable, str(script), str(tmp_path / "outputs"), "--config", "c.yaml", "--port", str(port),
           "--auth-file", str(users), "--max-file-size", "4kb"]
    base = f"http://127.0.0.1:{port}"
    with serving(cmd, port, tmp_path / "app.log", ROOT, env):
        assert _listen_addresses(port) <= {"0100007F", "00000000000000000000000001000000"}, \
            f"listening beyond the loopback: {_listen_addresses(port)}"

        def upload(client, size: int):
            return client.post(base + "/gradio_api/upload", files=[("files", ("a.png", b"x" * size, "image/png"))])

        with httpx.Client(timeout=30) as anon:
            assert upload(anon, 100).status_code == 401
        with httpx.Client(timeout=30) as client:
            assert client.post(base + "/login", data={"username": "alice", "password": "wrong"}).status_code == 400
            assert client.post(base + "/login", data={"username": "alice", "password": "pw-alice"}).status_code == 200
            small = upload(client, 1000)
            assert small.status_code == 200 and small.json()[0].endswith("a.png")
            big = upload(client, 50_000)
            assert big.status_code == 413, big.text
            leak = client.get(base + "/gradio_api/file=/etc/passwd")
            assert leak.status_code in (403, 404) and "root:" not in leak.text
