"""The stage hand-off: a DecoderStage checkpoint carries everything stage 2 and ``gsv3d predict`` need.

A stage-1 checkpoint's ``checkpoint["gsv3d"]`` records::

    {"stage": "decoder",
     "decoder": {"class_path": "gsv3d_pl.models.gs_decoder.GSDecoder", "init_args": {...}},
     "vae_key": "...", "dino_fingerprint": "..." | None, "dino_dim": 64 | None}

and its ``state_dict`` holds the decoder's weights under ``decoder.*`` (with ``ema_decay`` set, the weight
average under ``checkpoint["ema"]`` is handed on instead: it is what stage 1 evaluated). :func:`load_decoder` rebuilds the
decoder from that alone, so a distill config names only ``decoder_ckpt`` and cannot disagree with stage 1.

A decoder records its constructor arguments in ``decoder.config`` (diffusers' ``ConfigMixin`` with
``@register_to_config``, as :class:`~gsv3d_pl.models.GSDecoder` does; see ``docs/extending.md``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from typing import Any

from lightning.pytorch import LightningModule
from torch import nn

from gsv3d_pl.checkpoints import read_checkpoint

__all__ = ["DECODER_CKPT_KEY", "TRUSTED_KEY", "decoder_record", "build_decoder", "load_decoder", "resolve_decoder_class"]

DECODER_CKPT_KEY = "model.init_args.decoder_ckpt"
TRUSTED_KEY = "model.init_args.decoder_classes"
#: Decoder records naming a class under this package are imported without being listed in the config, and the
#: class must be defined in the project's models package.
PROJECT_PACKAGE = "gsv3d_pl."
PROJECT_MODELS = "gsv3d_pl.models."


def decoder_record(decoder: nn.Module) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` that rebuild ``decoder``'s architecture (not its weights).

    Raises TypeError for a decoder that does not record its constructor arguments.
    """
    config = getattr(decoder, "config", None)
    if config is None or not hasattr(config, "items"):
        raise TypeError(
            f"{type(decoder).__qualname__} does not record its constructor arguments, so stage 2 and `gsv3d predict` "
            "could not rebuild it from the checkpoint: subclass diffusers' ConfigMixin and decorate __init__ with "
            "@register_to_config (see docs/extending.md, 'A new decoder')."
        )
    cls = type(decoder)
    init_args = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def resolve_decoder_class(class_path: str, trusted: Iterable[str] = (), source: str = "the checkpoint") -> type:
    """The ``nn.Module`` subclass a decoder record names, if the record may name it.

    A checkpoint is data: the class it names is imported only when it is one of the project's (``gsv3d_pl.*``) or
    one the user's own config lists in ``decoder_classes`` (an extension's decoder). Anything else, anything
    that is not an ``nn.Module`` subclass (``os.system``, a function), a LightningModule (a stage, which would load
    further checkpoints), or a project-path name for a class defined elsewhere is refused before it is called.
    """
    class_path = str(class_path)
    trusted = {str(t) for t in trusted}
    if not (class_path.startswith(PROJECT_PACKAGE) or class_path in trusted):
        raise ValueError(f"{DECODER_CKPT_KEY}: {source} names decoder class {class_path!r}, which is neither one of "
                         f"the project's (gsv3d_pl.*) nor listed in {TRUSTED_KEY}: refused (a checkpoint cannot "
                         f"choose code to run). If it is your own decoder, add {class_path!r} to {TRUSTED_KEY}.")
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{DECODER_CKPT_KEY}: {source} names decoder class {class_path!r}, which cannot be "
                         f"imported ({type(e).__name__}: {e}); is the package that defines it installed?") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or issubclass(cls, LightningModule):
        raise ValueError(f"{DECODER_CKPT_KEY}: {source} names {class_path!r} as its decoder class, but that is not a "
                         "torch.nn.Module subclass (a network, not a training stage): refused")
    if class_path not in trusted and not str(cls.__module__).startswith(PROJECT_MODELS):
        # e.g. a third-party class re-exported by a project module: only the project's own models go unlisted
        raise ValueError(f"{DECODER_CKPT_KEY}: {source} names {class_path!r}, defined in {cls.__module__}, not in "
                         f"{PROJECT_MODELS}*: refused. If it is your decoder, add {class_path!r} to {TRUSTED_KEY}.")
    return cls


def build_decoder(record: dict[str, Any], source: str = "the checkpoint", trusted: Iterable[str] = ()) -> nn.Module:
    """Instantiate a decoder from :func:`decoder_record`'s dict (random weights); see :func:`resolve_decoder_class`."""
    class_path = str(record.get("class_path", ""))
    cls = resolve_decoder_class(class_path, trusted, source)
    init_args = record.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise ValueError(f"{DECODER_CKPT_KEY}: {source}: the decoder's init_args are not a mapping")
    try:
        return cls(**dict(init_args))
    except TypeError as e:
        raise ValueError(f"{DECODER_CKPT_KEY}: {source}: {class_path}(**init_args) failed: {e}") from e


def _read(path: str) -> dict:
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"{DECODER_CKPT_KEY}: stage-1 decoder checkpoint {path!r} not found. Train stage 1 first (e.g. "
            "`gsv3d fit --config configs/decoder/tiny.yaml` writes runs/decoder_tiny/checkpoints/last.ckpt) "
            "or point the key at an existing DecoderStage checkpoint."
        )
    return read_checkpoint(path, DECODER_CKPT_KEY, expected="a stage-1 (DecoderStage) checkpoint")


def load_decoder(path: str | os.PathLike, trusted: Iterable[str] = ()) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the stage-1 decoder of a DecoderStage checkpoint, weights loaded strictly.

    ``trusted``: decoder classes outside ``gsv3d_pl`` the checkpoint may name (``model.init_args.decoder_classes``).

    Returns:
        (decoder, meta): the decoder (in eval mode, still trainable: the caller freezes it) and the
        checkpoint's ``gsv3d`` record (frozen-encoder identities, the decoder's class and init args).

    Raises FileNotFoundError / ValueError naming the file, the config key and what to do.
    """
    path = os.fspath(path) if path else ""
    ckpt = _read(path)
    meta = ckpt.get("gsv3d") if isinstance(ckpt.get("gsv3d"), dict) else {}
    if meta.get("stage") not in (None, "decoder"):
        raise ValueError(f"{DECODER_CKPT_KEY}: {path!r} is a {meta.get('stage')!r}-stage checkpoint; give the "
                         "stage-1 (DecoderStage) checkpoint, e.g. runs/decoder_tiny/checkpoints/last.ckpt")
    record = meta.get("decoder")
    if not isinstance(record, dict) or "class_path" not in record:
        raise ValueError(f"{DECODER_CKPT_KEY}: {path!r} does not record its decoder's class and init args (a "
                         "checkpoint from an older version of this project); retrain stage 1 with this version")
    weights = {k[len("decoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("decoder.")}
    if isinstance(ckpt.get("ema"), dict):  # stage 1 kept a weight average: it is what was evaluated
        weights = dict(ckpt["ema"]["weights"])
    if not weights:
        raise ValueError(f"{DECODER_CKPT_KEY}: {path!r} holds no 'decoder.*' weights; is it a DecoderStage checkpoint?")
    decoder = build_decoder(record, repr(path), trusted)
    # A checkpoint holds what trained: a decoder's frozen parameters (e.g. a pretrained backbone it loads itself)
    # are not in it, and come from the rebuilt decoder.
    frozen = {n for n, p in decoder.named_parameters() if not p.requires_grad}
    try:
        missing, unexpected = decoder.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatches: torch lists them all
        missing, unexpected = [str(e)[:1500]], []
    missing = [k for k in missing if k not in frozen]
    if missing or unexpected:
        raise ValueError(f"{DECODER_CKPT_KEY}: {path!r}: the weights do not fit the decoder it records "
                         f"({record['class_path']}): missing {missing[:5]}, unexpected {list(unexpected)[:5]}")
    return decoder.eval(), meta
