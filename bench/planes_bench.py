"""What is left to compress between two epochs of a checkpoint, per byte plane.

For two consecutive full checkpoints (``torch.save`` files, e.g. the epoch inputs that
``bench/peers_bench.py --inputs-dir DIR`` keeps), groups the float32 tensors into the model's
weights, AdamW's ``exp_avg`` and ``exp_avg_sq``, splits each group into its 4 byte planes (plane 3
holds the sign and 7 exponent bits) and prints, as compressed size / raw size with zstd level 1:

  whole   the newer epoch's plane on its own (what a keyframe stores)
  xor     the plane of ``new XOR old`` (coral's lossless delta)
  sub     the plane of the zigzag-coded integer difference of the float bits (a subtractive delta)
  H0      the plane's order-0 entropy per 128 KiB block (the floor of an order-0 coder that adapts
          per block, as zstd's Huffman-coded literals do)

and per group the totals, with the best of whole/xor chosen per plane. No timing: this is where the
bytes go, not how fast they are coded.

    .venv/bin/python bench/planes_bench.py /tmp/peers-inputs/random/epoch3.pt /tmp/peers-inputs/random/epoch4.pt
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import zstandard


def groups(ckpt: dict) -> dict[str, np.ndarray]:
    """float32 bits of the weights and of each AdamW moment, each group as one uint32 array."""
    out: dict[str, list[torch.Tensor]] = {"weights": [], "exp_avg": [], "exp_avg_sq": []}
    for t in ckpt.get("state_dict", {}).values():
        if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
            out["weights"].append(t.reshape(-1))
    for opt in ckpt.get("optimizer_states", []):
        for st in opt.get("state", {}).values():
            for k in ("exp_avg", "exp_avg_sq"):
                t = st.get(k)
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    out[k].append(t.reshape(-1))
    return {k: torch.cat(v).numpy().view(np.uint32) for k, v in out.items() if v}


def plane_ratio(comp: zstandard.ZstdCompressor, plane: np.ndarray) -> float:
    return min(len(comp.compress(np.ascontiguousarray(plane).data)), plane.size) / max(plane.size, 1)


BLOCK = 128 << 10


def entropy0(plane: np.ndarray) -> float:
    """Order-0 entropy in bytes per byte, each :data:`BLOCK` bytes on their own, size-weighted."""
    plane = np.ascontiguousarray(plane)
    bits = 0.0
    for start in range(0, plane.size, BLOCK):
        h = np.bincount(plane[start : start + BLOCK], minlength=256).astype(np.float64)
        p = h[h > 0] / h.sum()
        bits += float(-(p * np.log2(p)).sum()) * h.sum()
    return bits / 8 / max(plane.size, 1)


def planes(bits: np.ndarray) -> np.ndarray:
    return bits.view(np.uint8).reshape(-1, 4).T  # [plane, element]


def subtractive(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Zigzag-coded difference of the float bits read as sign-magnitude integers."""
    def ordered(b: np.ndarray) -> np.ndarray:
        v = b.astype(np.int64)
        return np.where(v & 0x80000000, -(v & 0x7FFFFFFF), v)

    d = ordered(new) - ordered(old)
    z = (d << 1) ^ (d >> 63)
    return (z & 0xFFFFFFFF).astype(np.uint32)  # |d| < 2**31 for finite floats of one sign


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", help="the earlier epoch's torch.save file")
    ap.add_argument("new", help="the next epoch's torch.save file")
    args = ap.parse_args(argv)
    old, new = (groups(torch.load(f, weights_only=True)) for f in (args.old, args.new))
    comp = zstandard.ZstdCompressor(level=1)
    print("| group | MB | plane | whole | xor | sub | H0 |")
    print("|---|---:|---|---:|---:|---:|---:|")
    totals = []
    for name in new:
        if name not in old or old[name].size != new[name].size:
            print(f"| {name} | - | shapes differ between the two files | | | | |")
            continue
        pw, px, ps = planes(new[name]), planes(new[name] ^ old[name]), planes(subtractive(old[name], new[name]))
        rows = [(plane_ratio(comp, pw[k]), plane_ratio(comp, px[k]), plane_ratio(comp, ps[k]), entropy0(pw[k]))
                for k in range(4)]
        mb = new[name].nbytes / 1e6
        for k, (w, x, s, h) in enumerate(rows):
            print(f"| {name} | {mb:.1f} | {k}{' (sign+exp)' if k == 3 else ''} | {w:.3f} | {x:.3f} | {s:.3f} | {h:.3f} |")
        mean = [sum(r[i] for r in rows) / 4 for i in range(3)]
        best = sum(min(r[0], r[1]) for r in rows) / 4
        totals.append((name, mb, *mean, best))
    print("\n| group | whole | xor | sub | best of whole/xor per plane |")
    print("|---|---:|---:|---:|---:|")
    for name, mb, w, x, s, b in totals:
        print(f"| {name} ({mb:.1f} MB) | {w:.3f} | {x:.3f} | {s:.3f} | {b:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
