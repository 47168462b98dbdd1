"""Training stages (LightningModules): stage 1 :class:`DecoderStage`, stage 2 :class:`DistillStage`, and
:class:`SV3DStage` (fine-tuning SV3D's UNet with its EDM loss).

Imported lazily (they pull in diffusers/peft through the models).
"""

_LAZY = {
    "DecoderStage": "gsv3d_pl.stages.decoder_stage",
    "DistillStage": "gsv3d_pl.stages.distill_stage",
    "SV3DStage": "gsv3d_pl.stages.sv3d_stage",
    "load_decoder": "gsv3d_pl.stages.handoff",
    "decoder_record": "gsv3d_pl.stages.handoff",
    "L3DWeights": "gsv3d_pl.stages.losses",
    "render_loss": "gsv3d_pl.stages.losses",
    "render_views": "gsv3d_pl.stages.losses",
    "NonFiniteLossError": "gsv3d_pl.stages.losses",
    "heldout_evaluation": "gsv3d_pl.stages.heldout",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gsv3d_pl.stages' has no attribute {name!r}")
