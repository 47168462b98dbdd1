"""An exponential moving average of a module's weights, for evaluation and export.

The average is a frozen copy of the module, registered as a child so it follows the stage across devices.
Being frozen, it is not in the stage's ``state_dict`` (:meth:`StageBase.saved_keys`); the stage stores it
under ``checkpoint["ema"]`` itself, so a resumed run continues the same average.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["WeightEMA"]


class WeightEMA(nn.Module):
    """``ema ← decay · ema + (1 − decay) · weights`` after every optimizer step; buffers are copied.

    The first ``1 / (1 − decay)`` updates use the warm-up decay ``min(decay, (1 + n) / (10 + n))`` (as timm's
    and diffusers' EMA do), so that an early evaluation is not dominated by the random initialisation.
    """

    def __init__(self, module: nn.Module, decay: float):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"model.init_args.ema_decay must be in (0, 1) or null, got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(module).requires_grad_(False).eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long), persistent=False)

    def train(self, mode: bool = True) -> WeightEMA:  # noqa: ARG002 - the average is only ever evaluated
        return super().train(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        n = int(self.num_updates)
        d = min(self.decay, (1 + n) / (10 + n))
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1.0 - d)
        for e, b in zip(self.module.buffers(), module.buffers()):
            e.copy_(b)
        self.num_updates += 1

    def state(self) -> dict:
        """What a checkpoint stores: the averaged weights and the update count."""
        return {"weights": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
                "num_updates": int(self.num_updates)}

    def load_state(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.num_updates.fill_(int(state["num_updates"]))
