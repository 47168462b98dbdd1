"""Tiny LightningModules for tests/test_hostile_inputs.py, reached by ``gsv3d fit`` through their class_path."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader


class BigCheckpointModel(pl.LightningModule):
    """Four trainable numbers plus ``megabytes`` of persistent ballast, so each checkpoint write takes a while."""

    def __init__(self, megabytes: int = 128):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))
        self.register_buffer("ballast", torch.ones(megabytes * 2**18))  # float32: megabytes MiB

    def training_step(self, batch, batch_idx):
        return (self.w - batch).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class NumbersData(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(torch.randn(10_000, 4, generator=torch.Generator().manual_seed(0)), batch_size=1)
