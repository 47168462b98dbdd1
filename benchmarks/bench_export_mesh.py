"""Time of ``gsv3d export-mesh`` per step, and its round-trip accuracy, on Gaussians made from toy objects.

    python benchmarks/bench_export_mesh.py [--gaussians 100000] [--objects 0 8] [--repeats 3] [--inset 0 0.4]

For each toy object (datamodules/toy.py, normalised to the unit bounding box) ``--gaussians`` surfels are sampled on
its surface with its colours (:func:`gsv3d_pl.export.roundtrip.gaussians_on_mesh`) and exported at the default
settings (configs/README.md "Mesh export"). Printed: the median of ``--repeats`` runs of every step, the total
(target: <= 30 s for 100k Gaussians on 2 CPU cores), and the exported mesh against the Gaussians at 8 orbit
cameras (silhouette IoU, RGB PSNR in the union of the masks; :func:`gsv3d_pl.export.roundtrip.compare_renders`).
One warm-up export (numba kernels, the GL context) runs first and is not counted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def toy_gaussians(index: int, num: int):
    from datamodules.toy import make_toy_scene
    from gsv3d_pl.export.roundtrip import gaussians_on_mesh

    scene, family = make_toy_scene(index)
    lo, hi = scene.bounds
    T = np.eye(4)
    T[:3, :3] *= 1.0 / (hi - lo).max()
    T[:3, 3] = -(lo + hi) / 2 / (hi - lo).max()
    scene.apply_transform(T)
    return gaussians_on_mesh(scene, num, seed=0), family


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gaussians", type=int, default=100_000)
    p.add_argument("--objects", type=int, nargs="+", default=[0, 8], help="toy object indices")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--faces", type=int, default=None, help="override the default target face count")
    p.add_argument("--texture-size", type=int, default=None)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--inset", type=float, nargs="+", default=None,
                   help="ridge inset(s) to compare in one run (default: the setting's default only)")
    args = p.parse_args(argv)

    import torch

    from gsv3d_pl.cameras import orbit_cameras
    from gsv3d_pl.export import STEPS, ExportSettings, export_mesh
    from gsv3d_pl.export.roundtrip import compare_renders

    s = ExportSettings()
    for k in ("faces", "texture_size", "resolution"):
        if getattr(args, k) is not None:
            setattr(s, k, getattr(args, k))
    print(f"export-mesh: {args.gaussians:,} Gaussians, resolution {s.resolution}, {s.faces:,} faces, "
          f"{s.texture_size}² texture, {s.bake_views} bake views at {s.bake_size}²; {torch.get_num_threads()} "
          f"torch threads, {os.cpu_count()} CPUs; median of {args.repeats} runs")
    cams = orbit_cameras(8, 20.0, 2.0, 33.8, 256, 256)
    with tempfile.TemporaryDirectory() as tmp:
        warm, _ = toy_gaussians(args.objects[0], 2000)
        export_mesh(warm, os.path.join(tmp, "warm.glb"), ExportSettings(resolution=32, faces=500, texture_size=64,
                                                                          bake_views=2, bake_size=32))
        insets = args.inset if args.inset is not None else [s.inset]
        header = f"{'object':<14}{'inset':>6}" + "".join(f"{name:>22}" for name in (*STEPS, "total")) + f"{'IoU':>7}{'PSNR':>7}"
        print(header)
        for idx in args.objects:
            g, family = toy_gaussians(idx, args.gaussians)
            for inset in insets:
                s.inset = inset
                runs = []
                out = os.path.join(tmp, f"{idx}.glb")
                for _ in range(args.repeats):
                    mesh, _ = export_mesh(g, out, s)
                    runs.append(mesh.timings)
                med = {k: statistics.median(r[k] for r in runs) for k in STEPS}
                total = statistics.median(sum(r.values()) for r in runs)
                m = compare_renders(g, out, cams.c2w, cams.K, 256)
                print(f"{f'{idx} {family}':<14}{inset:>6g}" + "".join(f"{med[k]:>21.2f}s" for k in STEPS)
                      + f"{total:>21.2f}s{m['iou']:>7.3f}{m['psnr']:>7.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
