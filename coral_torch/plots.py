"""`coral-torch stats --plot`: bytes per commit and which layers change, epoch over epoch.

Needs matplotlib (``pip install coral-torch[plot]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import CoralError
from .inspect import tensor_change, tensors_of

if TYPE_CHECKING:
    from .repository import CommitRow, Repository


def change_matrix(repo: Repository, commits: Sequence[CommitRow]) -> tuple[list[str], np.ndarray]:
    """Relative L2 change of each model tensor between consecutive commits: a ``(tensors,
    len(commits) - 1)`` matrix and the tensor names of its rows (at most 60 float tensors, the
    optimizer, callback and loop state left out)."""
    names: list[str] = []
    cols = []
    prev = None
    for row in commits:
        cur = tensors_of(repo, row.id)
        if prev is not None:
            if not names:
                names = [
                    n
                    for n in cur
                    if n in prev
                    and not n.startswith(("optimizer_states", "callbacks", "loops"))
                    and cur[n].is_floating_point()
                ][:60]
            cols.append([tensor_change(prev[n], cur[n])[1] if n in prev and n in cur else np.nan for n in names])
        prev = cur
    return names, np.array(cols, dtype=float).T if cols else np.zeros((0, 0))


def plot_repository(repo: Repository, out: Path, run: str | None = None) -> None:
    """Write a PNG to ``out``: bytes per commit (logical vs stored) next to a heatmap of the
    per-tensor change between consecutive commits of ``run`` (default: the latest commit's run).
    Raises :class:`~coral_torch.errors.CoralError` without matplotlib or without commits."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise CoralError("plotting needs matplotlib: pip install 'coral-torch[plot]'") from exc
    commits = list(reversed(repo.log(run)))
    if not commits:
        raise CoralError(f"repository {repo.path} has no commits to plot")
    if run is None:
        run = commits[-1].run
        commits = [c for c in commits if c.run == run]
    names, mat = change_matrix(repo, commits)
    fig, axes = plt.subplots(1, 2, figsize=(14, max(4, 0.18 * len(names) + 2)), gridspec_kw={"width_ratios": [1, 1.4]})
    x = np.arange(len(commits))
    axes[0].bar(x - 0.2, [c.logical_bytes / 1e6 for c in commits], 0.4, label="logical (torch.save)")
    axes[0].bar(x + 0.2, [c.new_bytes / 1e6 for c in commits], 0.4, label="stored by coral")
    axes[0].set_xticks(x, [f"e{c.epoch}" if c.epoch is not None else c.short_id[:6] for c in commits], rotation=45)
    axes[0].set_ylabel("MB")
    axes[0].set_title(f"bytes per commit (run {run})")
    axes[0].legend()
    if mat.size:
        with np.errstate(divide="ignore"):
            img = axes[1].imshow(np.log10(np.maximum(mat, 1e-12)), aspect="auto", cmap="viridis")
        axes[1].set_yticks(range(len(names)), names, fontsize=6)
        axes[1].set_xticks(
            range(mat.shape[1]),
            [f"{a.epoch}->{b.epoch}" for a, b in zip(commits, commits[1:])],
            rotation=45,
            fontsize=7,
        )
        axes[1].set_title("log10 relative L2 change per tensor")
        fig.colorbar(img, ax=axes[1])
    else:
        axes[1].text(0.5, 0.5, "need two commits of one run", ha="center")
        axes[1].axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
