"""A Lightning run with CoralModelParallelStrategy (FSDP2, 2 CPU ranks, gloo) for tests/integrations/test_dcp.py.

    python tests/_mp_worker.py '<json args>'

Lightning starts rank 1 by running this same command again. Rank 0 writes ``<out>.json`` (commit
ids, the final weights gathered) and ``<out>.pt``.

Probes of the background sharded saves (``probe`` in the args, see :class:`Probe`): ``gate`` holds
the coordinator's publish of the first save until the training thread ran two more batches;
``fail`` makes the coordinator's publish of the second save fail; ``interrupt`` raises
KeyboardInterrupt in the training step (every rank) while the second save's publish is held, and
lets it go on once Lightning handles the interrupt. A rank whose fit raised writes
``<out>.error<rank>.json``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import warnings

import torch

warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from coral_torch.callbacks import CoralCheckpoint, CoralModelParallelStrategy  # noqa: E402
from coral_torch.dcp import CoralStorageWriter  # noqa: E402


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


class Probe(pl.Callback):
    """Holds, fails or interrupts the coordinator's publish (``CoralStorageWriter.finish``, run on
    rank 0's background thread) of one save, and counts the batches trained while a save runs."""

    def __init__(self, mode: str):
        self.mode = mode
        self.released = threading.Event()
        self.publishes = 0
        self.batches_while_saving = 0
        self.gate_timed_out = False
        self.interrupt = False
        real_finish = CoralStorageWriter.finish
        probe = self

        def finish(writer, metadata, results):
            probe.publishes += 1
            n = probe.publishes
            if probe.mode == "fail" and n == 2:
                raise RuntimeError("publish refused by the probe")
            if (probe.mode == "gate" and n == 1) or (probe.mode == "interrupt" and n == 2):
                if probe.mode == "interrupt":
                    probe.interrupt = True  # the training thread raises at its next step
                probe.gate_timed_out = not probe.released.wait(60)
            return real_finish(writer, metadata, results)

        CoralStorageWriter.finish = finish

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        saves = trainer.strategy.background_saves
        if self.mode == "fail" and trainer.current_epoch == 2 and trainer.is_global_zero:
            while saves.running:  # rank 0 lets the failing save end before CoralCheckpoint polls
                time.sleep(0.01)
        if saves.running:
            self.batches_while_saving += 1
            if self.mode == "gate" and self.batches_while_saving >= 2:
                self.released.set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # every rank at the same step (the flag is rank 0's; a collective shares it)
        flag = torch.tensor([float(self.interrupt)])
        flag = trainer.strategy.reduce(flag, reduce_op="sum")
        if flag.item() > 0:
            raise KeyboardInterrupt

    def on_exception(self, trainer, pl_module, exception):
        self.released.set()  # (listed before CoralCheckpoint: it waits for the save in flight)


def main() -> None:
    args = json.loads(sys.argv[1])
    if args.get("cache_root"):  # each rank its own cache, as on separate nodes (Lightning starts rank 1 itself)
        os.environ["CORAL_CACHE_DIR"] = os.path.join(args["cache_root"], f"rank{os.environ.get('LOCAL_RANK', '0')}")
    pl.seed_everything(3, verbose=False)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 16, generator=g), torch.randn(64, 4, generator=g))
    model = Sharded()
    probe = Probe(args["probe"]) if args.get("probe") else None
    callbacks = [probe] if probe is not None else []
    coral = None
    if args.get("coral", True):
        coral = CoralCheckpoint(repo=args["repo"], run="mp", **args.get("callback", {}))
        callbacks.append(coral)
    if args.get("model_checkpoint"):
        callbacks.append(ModelCheckpoint(dirpath=args["ckdir"], filename="{epoch}", save_top_k=1, monitor="train_loss",
                                         save_last=True))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_epochs=args["epochs"], logger=False, enable_progress_bar=False,
        enable_model_summary=False,
        strategy=CoralModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, **args.get("strategy", {})),
        callbacks=callbacks,
    )
    try:
        trainer.fit(model, DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1)),
                    ckpt_path=args.get("ckpt"))
    except BaseException as exc:
        with open(f"{args['out']}.error{os.environ.get('LOCAL_RANK', '0')}.json", "w") as f:
            json.dump({"type": type(exc).__name__, "message": str(exc), "step": trainer.global_step}, f)
        raise
    weights = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
               for k, v in model.state_dict().items()}
    if trainer.is_global_zero:
        torch.save(weights, args["out"] + ".pt")
        with open(args["out"] + ".json", "w") as f:
            json.dump({"last": coral.last_commit if coral else None, "epoch": trainer.current_epoch,
                       "history": coral.history if coral else None,
                       "batches_while_saving": probe.batches_while_saving if probe else None,
                       "gate_timed_out": probe.gate_timed_out if probe else None}, f, default=str)


if __name__ == "__main__":
    main()
