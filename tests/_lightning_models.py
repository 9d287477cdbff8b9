"""Tiny LightningModules and helpers shared by tests/integrations/test_lightning.py and tests/_lightning_worker.py.

Everything here is deterministic on CPU: data comes from fixed generators, the train loader
shuffles with the global torch RNG (which `seed_everything` and the callback's RNG state control).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

TRAINER_DEFAULTS = dict(
    accelerator="cpu",
    enable_progress_bar=False,
    enable_model_summary=False,
    logger=False,
    num_sanity_val_steps=0,
)


class TinyModel(pl.LightningModule):
    """Linear-BatchNorm-ReLU-Dropout-Linear, AdamW + StepLR. ``val_schedule`` replaces the real
    validation loss by fixed values per epoch (to test top-k ranking independently of training)."""

    def __init__(self, lr: float = 1e-2, hidden: int = 32, val_schedule: Optional[Sequence[float]] = None,
                 compile_net: bool = False, optimizer: str = "adamw"):
        super().__init__()
        self.save_hyperparameters()
        net = nn.Sequential(nn.Linear(8, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.1),
                            nn.Linear(hidden, 1))
        self.net = torch.compile(net, backend="eager") if compile_net else net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y.float())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y.float())
        if self.hparams.val_schedule is not None:
            schedule = self.hparams.val_schedule
            loss = torch.tensor(float(schedule[min(self.current_epoch, len(schedule) - 1)]))
        self.log("val_loss", loss)

    def configure_optimizers(self) -> Any:
        if self.hparams.optimizer == "sgd":  # stateless: no per-parameter optimizer state
            opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)}


class BigModel(pl.LightningModule):
    """A few 1024x1024 layers: a full checkpoint (weights + AdamW moments) is ~50 MB."""

    def __init__(self, width: int = 1024, layers: int = 4, lr: float = 1e-4):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.Tanh())])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return self.net(x).pow(2).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def tiny_loaders(n: int = 256, batch_size: int = 32, generator_seed: Optional[int] = None) -> tuple[DataLoader, DataLoader]:
    """Train and val loaders. ``generator_seed``: the train loader shuffles with its own
    ``torch.Generator`` (as users write for reproducible data order) instead of the global RNG."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    own = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
    train = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=own)
    val = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=batch_size)
    return train, val


class TinyDataModule(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()

    def train_dataloader(self) -> DataLoader:
        return tiny_loaders()[0]

    def val_dataloader(self) -> DataLoader:
        return tiny_loaders()[1]


def big_loader(width: int = 1024, n: int = 64, batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, width, generator=g)), batch_size=batch_size, shuffle=True)


# --------------------------------------------------------------------------------- comparison
def tensor_bytes(t: torch.Tensor) -> tuple[str, tuple, bytes]:
    t = t.detach().cpu().contiguous()
    return str(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()


def diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where ``a`` and ``b`` differ; tensors compared by dtype, shape and raw bytes."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{path}: tensor vs {type(a).__name__}/{type(b).__name__}"]
        return [] if tensor_bytes(a) == tensor_bytes(b) else [f"{path}: tensor bytes differ"]
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        if set(a) != set(b):
            out.append(f"{path}: keys {sorted(map(str, set(a) ^ set(b)))} differ")
        for k in a:
            if k in b:
                out += diff(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if type(a) is not type(b):
            return [f"{path}: {type(a).__name__} vs {type(b).__name__}"]
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += diff(x, y, f"{path}/{i}")
        return out
    if type(a) is not type(b):
        return [f"{path}: {type(a).__name__} {a!r} vs {type(b).__name__} {b!r}"]
    try:
        same = bool(a == b)
    except Exception:  # noqa: BLE001
        same = repr(a) == repr(b)
    return [] if same else [f"{path}: {a!r} vs {b!r}"]


def train_state(model: pl.LightningModule, trainer: pl.Trainer) -> dict[str, Any]:
    """Everything that must match after an exact resume."""
    return {
        "state_dict": model.state_dict(),
        "optimizers": [o.state_dict() for o in trainer.optimizers],
        "schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
    }
