"""A small LightningModule and DataModule shared by the examples and the LightningCLI configs."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class MLP(pl.LightningModule):
    """An MLP classifier with BatchNorm, AdamW and a cosine schedule."""

    def __init__(self, width: int = 512, lr: float = 1e-3, epochs: int = 5):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, width), nn.BatchNorm1d(width), nn.GELU(),
            nn.Linear(width, width), nn.GELU(), nn.Linear(width, 10),
        )

    def training_step(self, batch, _):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.hparams.epochs)}


class SyntheticData(pl.LightningDataModule):
    """A deterministic 10-class problem on 64 features."""

    def __init__(self, n: int = 2048, batch_size: int = 64, seed: int = 0):
        super().__init__()
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.n, 64, generator=g)
        y = (x[:, :10].argmax(1) + (x[:, 10] > 0).long()) % 10
        cut = int(self.n * 0.875)
        self.train_set = TensorDataset(x[:cut], y[:cut])
        self.val_set = TensorDataset(x[cut:], y[cut:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=256)
