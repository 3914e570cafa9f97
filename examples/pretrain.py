"""Pretrain entry point: `python examples/pretrain.py [CONFIG.yaml] [key.path=value ...]`, or under
`torchrun --nproc-per-node N examples/pretrain.py ...`. Same as the `linear-moe-pretrain` console script."""
import sys

from linear_moe.cli import pretrain_main

if __name__ == "__main__":
    sys.exit(pretrain_main())
