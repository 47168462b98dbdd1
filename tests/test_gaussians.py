"""Tests for gsv3d_pl.gaussians: container semantics and the 3DGS PLY format."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from gsv3d_pl.gaussians import PLY_PROPERTIES, SH_C0, Gaussians


def make(n: int = 50, batch: tuple[int, ...] = (), seed: int = 0) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, n, 4, generator=g)
    return Gaussians(
        means=torch.randn(*batch, n, 3, generator=g),
        quats=q / q.norm(dim=-1, keepdim=True),
        scales=torch.rand(*batch, n, 3, generator=g) * 0.1 + 1e-3,
        opacities=torch.rand(*batch, n, generator=g) * 0.98 + 0.01,
        colors=torch.rand(*batch, n, 3, generator=g),
    )


def test_shapes_index_cat_to():
    g = make(10, (2, 3))
    assert g.batch_shape == (2, 3) and g.num_gaussians == 10 and len(g) == 2
    assert g[1].batch_shape == (3,) and torch.equal(g[1, 2].means, g.means[1, 2])
    assert g[:, 1:].batch_shape == (2, 2)
    c = Gaussians.cat([g, make(5, (2, 3), seed=1)])
    assert c.num_gaussians == 15 and torch.equal(c.colors[..., 10:, :], make(5, (2, 3), seed=1).colors)
    b = Gaussians.cat([g, g], dim=0)
    assert b.batch_shape == (4, 3)
    assert Gaussians.stack([g[0], g[1]]).batch_shape == (2, 3, ) and g.reshape_batch(6).batch_shape == (6,)
    d = g.to(torch.float64)
    assert d.means.dtype == torch.float64 and d.opacities.dtype == torch.float64
    r = make(4)
    r.means.requires_grad_(True)
    assert not r.detach().means.requires_grad
    with pytest.raises(IndexError):
        make(3)[0]


def test_shape_validation():
    g = make(5)
    with pytest.raises(ValueError, match="quats"):
        Gaussians(g.means, g.quats[:, :3], g.scales, g.opacities, g.colors)
    with pytest.raises(ValueError, match="opacities"):
        Gaussians(g.means, g.quats, g.scales, g.opacities[:4], g.colors)


def test_ply_roundtrip(tmp_path):
    g = make(200)
    path = tmp_path / "sub" / "g.ply"
    g.save_ply(path)
    h = Gaussians.load_ply(path)
    for name in ("means", "quats", "scales", "opacities", "colors"):
        a, b = getattr(g, name), getattr(h, name)
        assert b.dtype == torch.float32
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    # Exactly the standard layout: header and 17 little-endian float32 per vertex.
    raw = path.read_bytes()
    header, data = raw.split(b"end_header\n", 1)
    assert b"format binary_little_endian 1.0" in header and b"element vertex 200" in header
    assert [ln.split()[-1].decode() for ln in header.splitlines() if ln.startswith(b"property")] == list(PLY_PROPERTIES)
    assert len(data) == 200 * 17 * 4
    first = struct.unpack("<17f", data[: 17 * 4])
    assert np.allclose(first[6:9], ((g.colors[0] - 0.5) / SH_C0).numpy(), atol=1e-5)
    assert np.isclose(first[9], torch.logit(g.opacities[0]).item(), atol=1e-4)
    assert np.allclose(first[10:13], g.scales[0].log().numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="unbatched"):
        make(3, (2,)).save_ply(tmp_path / "b.ply")
    assert not list(tmp_path.rglob("*.tmp"))
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["g.ply"]  # no temporary file left behind


def _write_ply(path, props, rows, fmt="binary_little_endian", n=None, extra=b""):
    n = len(rows) if n is None else n
    head = f"ply\nformat {fmt} 1.0\ncomment made by test\nelement vertex {n}\n"
    head += "".join(f"property float {p}\n" for p in props) + "end_header\n"
    path.write_bytes(head.encode() + np.asarray(rows, dtype="<f4").tobytes() + extra)


def test_load_ignores_f_rest_and_normalises(tmp_path):
    props = list(PLY_PROPERTIES[:9]) + [f"f_rest_{i}" for i in range(45)] + list(PLY_PROPERTIES[9:])
    row = [0.1, 0.2, 0.3, 0, 0, 0, 0.5, -0.5, 0.0] + [9.0] * 45 + [0.0, -3.0, -2.0, -1.0, 2.0, 0.0, 0.0, 0.0]
    p = tmp_path / "rest.ply"
    _write_ply(p, props, [row, row])
    g = Gaussians.load_ply(p)
    assert g.num_gaussians == 2
    assert torch.allclose(g.quats[0], torch.tensor([1.0, 0, 0, 0]))  # unnormalised rot is normalised
    assert torch.allclose(g.opacities[0], torch.tensor(0.5))
    assert torch.allclose(g.scales[0], torch.tensor([-3.0, -2.0, -1.0]).exp())
    assert torch.allclose(g.colors[0], torch.tensor([0.5 + 0.5 * SH_C0, 0.5 - 0.5 * SH_C0, 0.5]))


@pytest.mark.parametrize("case", ["truncated", "missing", "nan", "ascii", "garbage", "zero_quat"])
def test_malformed_ply_raises_valueerror_naming_file(tmp_path, case):
    p = tmp_path / f"{case}.ply"
    row = [0.0] * 13 + [1.0, 0.0, 0.0, 0.0]
    if case == "truncated":
        _write_ply(p, PLY_PROPERTIES, [row, row], n=3)
    elif case == "missing":
        _write_ply(p, [x for x in PLY_PROPERTIES if x != "opacity"], [row[:9] + row[10:]])
    elif case == "nan":
        bad = list(row)
        bad[11] = float("nan")
        _write_ply(p, PLY_PROPERTIES, [row, bad])
    elif case == "ascii":
        _write_ply(p, PLY_PROPERTIES, [row], fmt="ascii")
    elif case == "garbage":
        p.write_bytes(b"\x00\x01 not a ply file")
    elif case == "zero_quat":
        _write_ply(p, PLY_PROPERTIES, [[0.0] * 17])
    with pytest.raises(ValueError, match=case):
        Gaussians.load_ply(p)
