"""Dataset-renderer and loader throughput.

    python benchmarks/bench_render.py [--sizes 128 256 576] [--views 24] [--faces 50000] [--no-loader]

1. views/s of :class:`datamodules.MeshRenderer` on a textured ~50k-face mesh at each size, including readback of
   RGB + alpha + depth (the numbers ``prepare_data`` lives on). Target: ≥ 20 views/s at 256² on 2 CPU cores.
2. Anchor: Blender Cycles (CPU, 32 spp, 256²) on the same mesh and cameras through the optional ``bpy`` package
   (``pip install .[bench]``); prints the speed ratio (target ≥ 100×). Without bpy it says so and skips.
3. Loader: tiny-config batches from ObjaverseDataModule with num_workers=2, as data-wait time per step against a
   simulated training step (``--step-ms``, default 150 ms: a stricter bar than a real tiny DecoderStage step on
   2 CPU cores, which takes ~1.3 s).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_mesh(path: str, faces: int) -> None:
    """A textured torus-knot-like mesh with ~``faces`` triangles (checker texture, box-projected UVs)."""
    import trimesh
    from PIL import Image

    n = int(np.sqrt(faces / 2))
    mesh = trimesh.creation.torus(major_radius=0.35, minor_radius=0.12, major_sections=2 * n, minor_sections=n // 2)
    v = mesh.vertices
    mesh.vertices = v + 0.05 * np.sin(6 * np.arctan2(v[:, 0], v[:, 2]))[:, None] * np.array([0, 1, 0])
    yy, xx = np.mgrid[0:512, 0:512] // 32
    img = np.where(((xx + yy) % 2)[..., None] == 1, [230, 57, 70], [69, 123, 157]).astype(np.uint8)
    uv = np.stack([np.arctan2(v[:, 0], v[:, 2]) / (2 * np.pi) + 0.5, v[:, 1] + 0.5], 1)
    mesh.visual = trimesh.visual.TextureVisuals(
        uv=uv, material=trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(img)))
    with open(path, "wb") as f:
        f.write(trimesh.Scene(mesh).export(file_type="glb"))


def bench_renderer(path: str, sizes: list[int], views: int, supersample: int = 2, repeats: int = 5
                   ) -> dict[int, float]:
    """Median views/s over ``repeats`` renders of ``views`` orbit cameras (mesh uploaded once, as prepare_data)."""
    from datamodules.mesh_io import load_mesh
    from datamodules.mesh_render import MeshRenderer
    from gsv3d_pl.cameras import orbit_cameras

    mesh = load_mesh(path)
    print(f"mesh: {mesh.num_faces} faces, texture {mesh.primitives[0].texture.shape}")
    out = {}
    for s in sizes:
        r = MeshRenderer(s, supersample=supersample)
        cams = orbit_cameras(views, 20.0, width=s, height=s)
        gpu = r.upload(mesh)
        r.render_raw(gpu, cams.c2w[:2], cams.K[:2])  # warm-up: context, shaders, texture upload
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            r.render_raw(gpu, cams.c2w, cams.K)
            times.append(time.perf_counter() - t)
        gpu.release()
        dt = float(np.median(times))
        out[s] = views / dt
        print(f"moderngl/{r.ctx.info['GL_RENDERER'][:30]} SSAA {r.supersample}x{r.supersample}: {s}x{s}: "
              f"{views / dt:7.1f} views/s ({1000 * dt / views:.1f} ms/view incl. RGB+alpha+depth readback; "
              f"median of {repeats}, range {views / max(times):.1f}-{views / min(times):.1f})")
    return out


def bench_cycles(path: str, size: int, views: int, spp: int = 32) -> float | None:
    if views < 1:
        print("Blender Cycles anchor: skipped (--cycles-views 0)")
        return None
    try:
        import bpy  # noqa: F401
    except ImportError:
        print("Blender Cycles anchor: skipped (bpy not installed; `pip install .[bench]` for bpy 4.2.x)")
        return None
    import bpy
    from mathutils import Matrix

    from gsv3d_pl.cameras import opencv_to_opengl, orbit_cameras
    from gsv3d_pl.orbit import FOV_DEG

    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.import_scene.gltf(filepath=path)
    sc = bpy.context.scene
    # The settings of allenai/objaverse-xl's scripts/rendering/blender_script.py (what Zero123, SV3D-style
    # pipelines render with), except the sample count: 1 diffuse/glossy bounce, denoising, transparent film.
    sc.render.engine = "CYCLES"
    sc.cycles.device = "CPU"
    sc.cycles.samples = spp
    sc.cycles.diffuse_bounces = sc.cycles.glossy_bounces = 1
    sc.cycles.transparent_max_bounces = sc.cycles.transmission_bounces = 3
    sc.cycles.filter_width = 0.01
    sc.cycles.use_denoising = True
    sc.render.resolution_x = sc.render.resolution_y = size
    sc.render.film_transparent = True
    light = bpy.data.objects.new("sun", bpy.data.lights.new("sun", type="SUN"))
    sc.collection.objects.link(light)
    cam = bpy.data.objects.new("cam", bpy.data.cameras.new("cam"))
    sc.collection.objects.link(cam)
    sc.camera = cam
    cam.data.angle = np.deg2rad(FOV_DEG)  # square images: horizontal = vertical FoV
    # glTF import turns +Y-up into Blender's +Z-up: x' = x, y' = -z, z' = y
    yup_to_zup = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)
    cams = orbit_cameras(views, 20.0, width=size, height=size)
    sc.render.filepath = os.path.join(tempfile.mkdtemp(), "v.png")
    t = time.perf_counter()
    for i in range(views):
        cam.matrix_world = Matrix((yup_to_zup @ opencv_to_opengl(cams.c2w[i]).double().numpy()).tolist())
        bpy.ops.render.render(write_still=True)
    dt = time.perf_counter() - t
    vps = views / dt
    print(f"Blender {bpy.app.version_string} Cycles CPU {spp} spp {size}x{size} (RGBA only, no depth pass): "
          f"{vps:.3f} views/s ({1000 * dt / views:.0f} ms/view over {views} views)")
    return vps


def bench_loader(step_ms: float, steps: int) -> None:
    import torch

    from datamodules import ObjaverseDataModule
    from gsv3d_pl.orbit import NUM_FRAMES

    extra = 4
    with tempfile.TemporaryDirectory() as d:
        dm = ObjaverseDataModule(toy_objects=64, resolution=64, num_extra_views=extra, cache_dir=d, num_workers=2,
                                 batch_size=4)
        t = time.perf_counter()
        dm.prepare_data()
        print(f"toy set: 64 objects generated + rendered ({NUM_FRAMES + extra} views at 64²) in "
              f"{time.perf_counter() - t:.1f} s")
        dm.setup("fit")
        it = iter(dm.train_dataloader())
        next(it)  # worker start-up
        waits = []
        for _ in range(steps):
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                it = iter(dm.train_dataloader())
                batch = next(it)
            waits.append(time.perf_counter() - t)
            t = time.perf_counter()
            while time.perf_counter() - t < step_ms / 1000:  # simulated training step (busy, like a CPU step)
                torch.mm(torch.randn(64, 64), torch.randn(64, 64))
        assert batch["target_images"].shape[1:] == (25, 3, 64, 64)
        print(f"loader num_workers=2, batch 4 @64², simulated step {step_ms:.0f} ms: data wait per step "
              f"mean {1000 * np.mean(waits):.1f} ms, median {1000 * np.median(waits):.1f} ms, "
              f"max {1000 * np.max(waits):.1f} ms over {steps} steps")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 576])
    ap.add_argument("--views", type=int, default=24)
    ap.add_argument("--faces", type=int, default=50_000)
    ap.add_argument("--cycles-views", type=int, default=3)
    ap.add_argument("--step-ms", type=float, default=150.0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--supersample", type=int, default=2, help="s×s sub-samples per pixel (1 = off)")
    ap.add_argument("--repeats", type=int, default=5, help="renders of --views cameras per size (median)")
    ap.add_argument("--no-loader", action="store_true")
    args = ap.parse_args()
    print(f"CPU cores available: {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.1f} "
          "(timings scale with contention)")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench.glb")
        make_mesh(path, args.faces)
        vps = bench_renderer(path, args.sizes, args.views, args.supersample, args.repeats)
        if 256 in vps:
            print(f"target >= 20 views/s at 256²: {'PASS' if vps[256] >= 20 else 'FAIL'} ({vps[256]:.1f})")
        cyc = bench_cycles(path, 256, args.cycles_views)
        if cyc and 256 in vps:
            print(f"moderngl / Cycles at 256²: {vps[256] / cyc:.0f}x (target >= 100x)")
    if not args.no_loader:
        bench_loader(args.step_ms, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
