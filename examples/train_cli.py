"""LightningCLI entry point for the YAML files in configs/.

    python examples/train_cli.py fit --config configs/coral.yaml
    python examples/train_cli.py fit --config configs/coral.yaml --ckpt_path coral://latest
"""

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import MLP, SyntheticData  # noqa: E402


def main(args=None) -> None:
    LightningCLI(MLP, SyntheticData, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
