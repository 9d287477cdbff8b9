"""coral_torch.save / coral_torch.load as a drop-in for torch.save / torch.load.

Saves a model + optimizer every "epoch" exactly where torch.save would, prints what each costs,
and loads any of them back bit-exactly, by file or by hash.
"""

import argparse
import shutil
from pathlib import Path

import torch
from torch import nn

import coral_torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="save_load_run")
    args = ap.parse_args()
    out = Path(args.dir)
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5000, 128), nn.Flatten(), nn.Linear(128 * 8, 256), nn.ReLU(), nn.Linear(256, 2))
    model[0].requires_grad_(False)  # a frozen embedding: stored once, whatever the number of saves
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch_bytes = 0
    for epoch in range(4):
        for _ in range(20):
            x = torch.randint(0, 5000, (32, 8))
            loss = nn.functional.cross_entropy(model(x), (x[:, 0] % 2))
            opt.zero_grad()
            loss.backward()
            opt.step()
        ckpt = {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict()}
        out.mkdir(exist_ok=True)
        torch.save(ckpt, out / f"plain_epoch{epoch}.pt")
        torch_bytes += (out / f"plain_epoch{epoch}.pt").stat().st_size
        commit = coral_torch.save(ckpt, out / f"epoch{epoch}.pt")  # the one-word change
        print(f"epoch {epoch}: commit {commit[:10]}, pointer file {out / f'epoch{epoch}.pt'} "
              f"({(out / f'epoch{epoch}.pt').stat().st_size} bytes)")

    repo = coral_torch.open_repository(out / ".coral")
    stats = repo.stats()
    print(f"\ntorch.save: {torch_bytes / 1e6:.2f} MB in 4 files;  coral: {stats['disk_bytes'] / 1e6:.2f} MB "
          f"({stats['disk_bytes'] / torch_bytes:.2f}x)")

    back = coral_torch.load(out / "epoch2.pt")  # follows the pointer
    plain = torch.load(out / "plain_epoch2.pt")
    same = all(torch.equal(back["model"][k], plain["model"][k]) for k in plain["model"])
    print(f"epoch2 loaded from the pointer equals torch.load of the plain file: {same}")
    by_hash = coral_torch.load(coral_torch.api.read_pointer(out / "epoch3.pt")[0][:8], repo=out / ".coral")
    print(f"loaded epoch {by_hash['epoch']} by hash prefix; optimizer step counter "
          f"{int(by_hash['optimizer']['state'][0]['step'])}")


if __name__ == "__main__":
    main()
