"""The sampler's steps above the LoRA gate, shared between runs that would compute them identically.

With ``lora_sigma_max`` set, every sampler step above the gate runs the base model, with the LoRA on and off
alike. An evaluation that samples each object with the LoRA on and then off, from the same noise and
conditioning, can therefore take the off run's steps above the gate from the on run. On the miniature that is
6 of the 10 steps of the undistilled orbit. The cache lives only inside :meth:`SV3D.prefix_cache`, a span in which
the base weights do not change.
"""

from __future__ import annotations

import hashlib

from torch import Tensor

__all__ = ["PrefixCache"]


class PrefixCache:
    """``key -> x``: the sampler state after its first ``n`` steps, for at most ``max_entries`` orbits."""

    def __init__(self, max_entries: int = 256):
        self.max_entries = int(max_entries)
        self._store: dict[str, Tensor] = {}
        self.hits = 0

    @staticmethod
    def key(n_steps: int, *parts) -> str:
        """A digest of the prefix length and every input that decides the prefix (tensors by value)."""
        h = hashlib.sha1(str(n_steps).encode())
        for p in parts:
            if isinstance(p, Tensor):
                t = p.detach().float().cpu().contiguous()
                h.update(str(tuple(t.shape)).encode())
                h.update(t.numpy().tobytes())
            else:
                h.update(repr(p).encode())
        return h.hexdigest()

    def get(self, key: str) -> Tensor | None:
        x = self._store.get(key)
        if x is not None:
            self.hits += 1
            return x.clone()
        return None

    def put(self, key: str, x: Tensor) -> None:
        if len(self._store) >= self.max_entries:
            self._store.pop(next(iter(self._store)))  # the oldest
        self._store[key] = x.detach().clone()

    def __len__(self) -> int:
        return len(self._store)
