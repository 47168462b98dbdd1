"""3D Gaussians container and the standard 3DGS PLY format.

A :class:`Gaussians` holds activated parameters (the conventions of ``docs/conventions.md``):

- ``means`` [..., G, 3] world-space centres;
- ``quats`` [..., G, 4] rotations as unit wxyz quaternions;
- ``scales`` [..., G, 3] linear scales (> 0);
- ``opacities`` [..., G] in (0, 1);
- ``colors`` [..., G, 3] RGB in [0, 1].

The leading dims ``...`` are the batch shape (``()`` for a single set). PLY files use the layout written by the
reference 3DGS code (graphdeco-inria) and read by common splat viewers: binary little-endian float32 properties
``x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 opacity scale_0 scale_1 scale_2 rot_0 rot_1 rot_2 rot_3`` where
``f_dc = (color - 0.5) / C0`` (degree-0 spherical harmonics, C0 = 0.28209479), ``opacity`` is a logit,
``scale_i`` a natural log and ``rot`` a wxyz quaternion.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gsv3d_pl.io import atomic_write

__all__ = ["Gaussians", "SH_C0", "PLY_PROPERTIES"]

SH_C0 = 0.28209479177387814
PLY_PROPERTIES = (
    "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
    "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
)
_REQUIRED = tuple(p for p in PLY_PROPERTIES if p not in ("nx", "ny", "nz"))
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_TRAILING = {"means": 1, "quats": 1, "scales": 1, "opacities": 0, "colors": 1}  # per-Gaussian trailing dims
_WIDTH = {"means": 3, "quats": 4, "scales": 3, "opacities": None, "colors": 3}


@dataclass
class Gaussians:
    """A (batch of) 3D Gaussian set(s). See the module docstring for each field's shape and meaning."""

    means: Tensor  # [..., G, 3]
    quats: Tensor  # [..., G, 4] wxyz
    scales: Tensor  # [..., G, 3]
    opacities: Tensor  # [..., G]
    colors: Tensor  # [..., G, 3]

    def __post_init__(self) -> None:
        if self.means.dim() < 2 or self.means.shape[-1] != 3:
            raise ValueError(f"Gaussians: means must be [..., G, 3], got {tuple(self.means.shape)}")
        lead = tuple(self.means.shape[:-1])  # (..., G)
        for f in fields(self):
            x = getattr(self, f.name)
            if not isinstance(x, Tensor):
                raise TypeError(f"Gaussians: {f.name} must be a torch.Tensor, got {type(x).__name__}")
            width = _WIDTH[f.name]
            expected = lead if width is None else (*lead, width)
            if tuple(x.shape) != expected:
                raise ValueError(
                    f"Gaussians: {f.name} has shape {tuple(x.shape)}, expected {expected} "
                    f"(batch {lead[:-1]}, G={lead[-1]})"
                )

    # ------------------------------------------------------------------ shape / indexing
    @property
    def batch_shape(self) -> torch.Size:
        """Leading batch dims (``torch.Size([])`` for a single set)."""
        return self.means.shape[:-2]

    @property
    def num_gaussians(self) -> int:
        """G, the number of Gaussians per set."""
        return self.means.shape[-2]

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    def __len__(self) -> int:
        if not self.batch_shape:
            raise TypeError("len() of an unbatched Gaussians; use .num_gaussians")
        return self.batch_shape[0]

    def __getitem__(self, idx) -> Gaussians:
        """Index the batch dims only (e.g. ``g[0]``, ``g[1:3]``, ``g[mask]``); the Gaussian dim is kept whole."""
        if not self.batch_shape:
            raise IndexError("Gaussians: cannot index an unbatched set (index the batch dims only)")
        if not isinstance(idx, tuple):
            idx = (idx,)
        if any(i is Ellipsis for i in idx):
            raise IndexError("Gaussians: Ellipsis is not supported; index the batch dims explicitly")
        return self._map(lambda x, t: x[idx])

    def _map(self, fn) -> Gaussians:
        return Gaussians(**{f.name: fn(getattr(self, f.name), _TRAILING[f.name]) for f in fields(self)})

    def reshape_batch(self, *shape: int) -> Gaussians:
        """The same Gaussians with batch dims reshaped to ``shape``."""
        G = self.num_gaussians
        return self._map(lambda x, t: x.reshape(*shape, G, *x.shape[x.dim() - t:]))

    @staticmethod
    def cat(items: list[Gaussians], dim: int = -1) -> Gaussians:
        """Concatenate along the Gaussian dim (``dim=-1``, the default) or along a batch dim (``dim >= 0``)."""
        if not items:
            raise ValueError("Gaussians.cat: empty list")
        nb = len(items[0].batch_shape)
        if dim == -1:
            return Gaussians(**{
                f.name: torch.cat([getattr(g, f.name) for g in items], dim=nb) for f in fields(Gaussians)
            })
        if not 0 <= dim < nb:
            raise ValueError(f"Gaussians.cat: dim must be -1 (Gaussians) or a batch dim in [0, {nb}), got {dim}")
        return Gaussians(**{f.name: torch.cat([getattr(g, f.name) for g in items], dim=dim) for f in fields(Gaussians)})

    @staticmethod
    def stack(items: list[Gaussians], dim: int = 0) -> Gaussians:
        """Stack sets with equal G along a new batch dim."""
        return Gaussians(**{f.name: torch.stack([getattr(g, f.name) for g in items], dim=dim) for f in fields(Gaussians)})

    def to(self, *args, **kwargs) -> Gaussians:
        """``Tensor.to`` on every field (device and/or dtype)."""
        return self._map(lambda x, t: x.to(*args, **kwargs))

    def detach(self) -> Gaussians:
        return self._map(lambda x, t: x.detach())

    def clone(self) -> Gaussians:
        return self._map(lambda x, t: x.clone())

    # ------------------------------------------------------------------ PLY I/O
    def save_ply(self, path: str | os.PathLike) -> None:
        """Write an unbatched set as a binary little-endian 3DGS PLY, atomically (:func:`gsv3d_pl.io.atomic_write`)."""
        if self.batch_shape:
            raise ValueError(
                f"Gaussians.save_ply: expected an unbatched set, got batch shape {tuple(self.batch_shape)}; "
                "save g[i] for each item"
            )
        g = self.detach().to(device="cpu", dtype=torch.float64)
        n = g.num_gaussians
        eps = 1e-7
        opac = g.opacities.clamp(eps, 1 - eps)
        cols = [
            g.means,  # x y z
            torch.zeros(n, 3, dtype=torch.float64),  # nx ny nz (unused by 3DGS, kept for compatibility)
            (g.colors - 0.5) / SH_C0,  # f_dc_0..2
            torch.log(opac / (1 - opac))[:, None],  # opacity (logit)
            torch.log(g.scales.clamp(min=1e-30)),  # scale_0..2 (log)
            g.quats,  # rot_0..3 (wxyz)
        ]
        data = torch.cat(cols, dim=1).numpy().astype("<f4")  # [n, 17]
        header = "ply\nformat binary_little_endian 1.0\n" f"element vertex {n}\n"
        header += "".join(f"property float {p}\n" for p in PLY_PROPERTIES) + "end_header\n"
        with atomic_write(path, "wb") as f:
            f.write(header.encode("ascii"))
            f.write(data.tobytes())

    @classmethod
    def load_ply(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Gaussians:
        """Read a 3DGS PLY (binary little-endian; extra properties such as ``f_rest_*`` are ignored).

        Raises:
            ValueError naming the file if it is not such a PLY, is truncated, lacks a property or holds NaN/inf.
        """
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ValueError(f"Gaussians.load_ply: cannot read {path}: {e}") from e
        props, n, offset = _parse_header(raw, path)
        dtype = np.dtype([(name, "<" + _PLY_TYPES[t]) for name, t in props])
        need = n * dtype.itemsize
        if len(raw) - offset < need:
            raise ValueError(
                f"Gaussians.load_ply: {path} is truncated: header declares {n} vertices "
                f"({need} bytes) but only {len(raw) - offset} bytes of data follow"
            )
        rec = np.frombuffer(raw, dtype=dtype, count=n, offset=offset)

        def col(*names: str) -> np.ndarray:
            return np.stack([rec[k].astype(np.float64) for k in names], axis=-1)

        means = col("x", "y", "z")
        fdc = col("f_dc_0", "f_dc_1", "f_dc_2")
        opac_logit = col("opacity")[:, 0]
        log_scales = col("scale_0", "scale_1", "scale_2")
        quats = col("rot_0", "rot_1", "rot_2", "rot_3")
        for name, arr in (("x/y/z", means), ("f_dc", fdc), ("opacity", opac_logit), ("scale", log_scales),
                          ("rot", quats)):
            if not np.isfinite(arr).all():
                raise ValueError(f"Gaussians.load_ply: {path} has NaN/inf values in property {name}")
        qn = np.linalg.norm(quats, axis=-1, keepdims=True)
        if (qn <= 0).any():
            raise ValueError(f"Gaussians.load_ply: {path} has zero-norm quaternions (rot_0..3)")
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=torch.float32)
        return cls(
            means=t(means),
            quats=t(quats / qn),
            scales=t(np.exp(log_scales)),
            opacities=t(1.0 / (1.0 + np.exp(-opac_logit))),
            colors=t(np.clip(0.5 + SH_C0 * fdc, 0.0, 1.0)),
        )


def _parse_header(raw: bytes, path: Path) -> tuple[list[tuple[str, str]], int, int]:
    """(vertex properties [(name, type)], vertex count, byte offset of the data) of a binary LE PLY."""
    end = raw.find(b"end_header")
    if not raw.startswith(b"ply") or end < 0:
        raise ValueError(f"Gaussians.load_ply: {path} is not a PLY file (missing 'ply' magic or 'end_header')")
    nl = raw.find(b"\n", end)
    if nl < 0:
        raise ValueError(f"Gaussians.load_ply: {path} is truncated inside its header")
    try:
        lines = raw[:end].decode("ascii").replace("\r", "").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"Gaussians.load_ply: {path} has a non-ASCII header") from e
    fmt, elements, current = None, [], None
    for line in lines[1:]:
        tok = line.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        if tok[0] == "format":
            fmt = tok[1] if len(tok) > 1 else None
        elif tok[0] == "element" and len(tok) == 3:
            try:
                current = (tok[1], int(tok[2]), [])
            except ValueError as e:
                raise ValueError(f"Gaussians.load_ply: {path} has a bad element line {line!r}") from e
            elements.append(current)
        elif tok[0] == "property" and current is not None:
            if tok[1] == "list":
                raise ValueError(f"Gaussians.load_ply: {path}: list property in element {current[0]!r} "
                                 "is not supported for Gaussian splats")
            if len(tok) != 3 or tok[1] not in _PLY_TYPES:
                raise ValueError(f"Gaussians.load_ply: {path} has a bad property line {line!r}")
            current[2].append((tok[2], tok[1]))
        else:
            raise ValueError(f"Gaussians.load_ply: {path} has an unexpected header line {line!r}")
    if fmt != "binary_little_endian":
        raise ValueError(f"Gaussians.load_ply: {path} has format {fmt!r}; only binary_little_endian is supported")
    if not elements or elements[0][0] != "vertex":
        raise ValueError(f"Gaussians.load_ply: {path} must start with a 'vertex' element")
    _, n, props = elements[0]
    names = [p for p, _ in props]
    missing = [p for p in _REQUIRED if p not in names]
    if missing:
        raise ValueError(f"Gaussians.load_ply: {path} lacks the 3DGS properties {missing} (has {names})")
    if len(set(names)) != len(names):
        raise ValueError(f"Gaussians.load_ply: {path} has duplicate vertex properties")
    if n < 0:
        raise ValueError(f"Gaussians.load_ply: {path} declares a negative vertex count")
    return props, n, nl + 1
