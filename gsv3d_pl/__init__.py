"""GSV3D-PL: single image -> SV3D multi-view latents -> Gaussian-Splatting decoder -> 3D Gaussians."""

__version__ = "0.1.0"

# Stages pull in diffusers/peft; import them lazily so `gsv3d --help` and light tools stay fast.
_LAZY = {
    "DecoderStage": "gsv3d_pl.stages.decoder_stage",
    "DistillStage": "gsv3d_pl.stages.distill_stage",
    "SV3DStage": "gsv3d_pl.stages.sv3d_stage",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gsv3d_pl' has no attribute {name!r}")
