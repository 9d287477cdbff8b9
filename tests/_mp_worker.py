"""A Lightning run with CoralModelParallelStrategy (FSDP2, 2 CPU ranks, gloo) for tests/integrations/test_dcp.py.

    python tests/_mp_worker.py '<json args>'

Lightning starts rank 1 by running this same command again. Rank 0 writes ``<out>.json`` (commit
ids, the final weights gathered) and ``<out>.pt``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from coral_torch.callbacks import CoralCheckpoint, CoralModelParallelStrategy  # noqa: E402


class Sharded(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net[0], self.net[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def main() -> None:
    args = json.loads(sys.argv[1])
    if args.get("cache_root"):  # each rank its own cache, as on separate nodes (Lightning starts rank 1 itself)
        os.environ["CORAL_CACHE_DIR"] = os.path.join(args["cache_root"], f"rank{os.environ.get('LOCAL_RANK', '0')}")
    pl.seed_everything(3, verbose=False)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 16, generator=g), torch.randn(64, 4, generator=g))
    model = Sharded()
    callbacks = [CoralCheckpoint(repo=args["repo"], run="mp", **args.get("callback", {}))]
    if args.get("model_checkpoint"):
        callbacks.append(ModelCheckpoint(dirpath=args["ckdir"], filename="{epoch}", save_top_k=1, monitor="train_loss",
                                         save_last=True))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_epochs=args["epochs"], logger=False, enable_progress_bar=False,
        enable_model_summary=False, strategy=CoralModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        callbacks=callbacks,
    )
    trainer.fit(model, DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1)),
                ckpt_path=args.get("ckpt"))
    weights = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
               for k, v in model.state_dict().items()}
    if trainer.is_global_zero:
        torch.save(weights, args["out"] + ".pt")
        with open(args["out"] + ".json", "w") as f:
            json.dump({"last": callbacks[0].last_commit, "epoch": trainer.current_epoch}, f)


if __name__ == "__main__":
    main()
