"""Resume: a decoder run killed after k steps continues from `--ckpt_path last` with the same global step and
optimizer state; DDP on CPU (2 processes, gloo) runs the tiny decoder stage with each rank on different objects."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from gsv3d_pl.models import VAE, DINOEncoder, GSDecoder
from gsv3d_pl.stages.decoder_stage import DecoderStage
from tests.synthetic import SyntheticDataModule

ROOT = Path(__file__).resolve().parents[1]

# A child process: train the synthetic decoder stage for many steps, checkpointing every step, until killed.
CHILD = r"""
import sys, torch, lightning.pytorch as pl
from gsv3d_pl.models import VAE, DINOEncoder, GSDecoder
from gsv3d_pl.stages.decoder_stage import DecoderStage
from tests.synthetic import SyntheticDataModule
root = sys.argv[1]
pl.seed_everything(0)
stage = DecoderStage(vae=VAE("tiny"), dino=DINOEncoder("tiny", image_size=56),
                     decoder=GSDecoder.from_preset("tiny", dim=32, head_channels=16, upsample=2, dino_dim=64), heldout_eval=False, warmup_steps=2)
ck = pl.callbacks.ModelCheckpoint(dirpath=root + "/checkpoints", save_last=True, every_n_train_steps=1, save_top_k=-1)
trainer = pl.Trainer(max_steps=1000, default_root_dir=root, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, callbacks=[ck])
trainer.fit(stage, SyntheticDataModule(num_train=4, batch_size=2))
"""


def build_stage() -> DecoderStage:
    pl.seed_everything(0)
    return DecoderStage(vae=VAE("tiny"), dino=DINOEncoder("tiny", image_size=56),
                        decoder=GSDecoder.from_preset("tiny", dim=32, head_channels=16, upsample=2, dino_dim=64), heldout_eval=False, warmup_steps=2)


class Capture(pl.Callback):
    """Records the global step and optimizer state when training (re)starts."""

    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step
        self.opt = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in
                    _flat_state(trainer.optimizers[0].state_dict()).items()}
        self.sched_last_epoch = trainer.lr_scheduler_configs[0].scheduler.last_epoch


def _flat_state(sd: dict) -> dict:
    out = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            out[f"{pid}.{k}"] = v
    for i, g in enumerate(sd["param_groups"]):
        out[f"group{i}.lr"] = g["lr"]
    return out


def test_killed_run_resumes_with_identical_step_and_optimizer_state(tmp_path):
    k = 3
    root = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    last = root / "checkpoints" / "last.ckpt"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"training process ended early: {proc.stderr.read()[-2000:]}")
            # ModelCheckpoint writes step k's checkpoint and *then* last.ckpt: waiting for step k + 1's file
            # guarantees that last.ckpt holds step >= k when the kill lands (k itself raced in CI)
            if list((root / "checkpoints").glob(f"*-step={k + 1}.ckpt")):
                break
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint within 600 s")
    finally:
        proc.send_signal(signal.SIGKILL)  # a hard kill, as a pre-empted node
        proc.wait()
    saved = torch.load(last, map_location="cpu", weights_only=True)
    k_saved = saved["global_step"]
    assert k_saved >= k

    stage = build_stage()
    cap = Capture()
    trainer = pl.Trainer(max_steps=k_saved + 2, default_root_dir=str(root), accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[cap, pl.callbacks.ModelCheckpoint(dirpath=str(root / "checkpoints"),
                                                                      save_last=True, every_n_train_steps=1)])
    trainer.fit(stage, SyntheticDataModule(num_train=4, batch_size=2), ckpt_path="last")
    assert cap.step == k_saved
    want = _flat_state(saved["optimizer_states"][0])
    assert want.keys() == cap.opt.keys() and len(want) > 4
    for key, v in want.items():
        if torch.is_tensor(v):
            assert torch.equal(v, cap.opt[key]), key
        else:
            assert v == cap.opt[key], key
    assert cap.sched_last_epoch == saved["lr_schedulers"][0]["last_epoch"]
    assert trainer.global_step == k_saved + 2
    # the weights it resumed from are the checkpoint's
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["global_step"] == k_saved + 2


DDP_CHILD = r"""
import sys, json, torch, lightning.pytorch as pl
from gsv3d_pl.models import VAE, DINOEncoder, GSDecoder
from gsv3d_pl.stages.decoder_stage import DecoderStage
from tests.synthetic import SyntheticDataModule

class Seen(pl.Callback):
    def __init__(self): self.uids = []
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx): self.uids += list(batch["uid"])
    def on_train_end(self, trainer, pl_module):
        json.dump(self.uids, open(f"{sys.argv[1]}/seen_rank{trainer.global_rank}.json", "w"))

pl.seed_everything(0)
stage = DecoderStage(vae=VAE("tiny"), dino=DINOEncoder("tiny", image_size=56),
                     decoder=GSDecoder.from_preset("tiny", dim=32, head_channels=16, upsample=2, dino_dim=64), heldout_eval=True, warmup_steps=1)
trainer = pl.Trainer(max_steps=2, default_root_dir=sys.argv[1], accelerator="cpu", devices=2, strategy="ddp",
                     logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                     val_check_interval=2, check_val_every_n_epoch=None, enable_checkpointing=False,
                     callbacks=[Seen()])
trainer.fit(stage, SyntheticDataModule(num_train=4, num_val=2, num_test=2, batch_size=1))
"""


@pytest.mark.slow
def test_ddp_cpu_two_processes(tmp_path):
    """`--trainer.devices=2 --trainer.strategy=ddp` on CPU (gloo): both ranks train, on different objects."""
    import json

    # A script file, not `python -c`: Lightning's DDP launcher re-runs sys.argv for rank 1.
    script = tmp_path / "ddp_child.py"
    script.write_text(DDP_CHILD)
    res = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = [json.loads((tmp_path / f"seen_rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert (tmp_path / "heldout_eval.json").exists()
