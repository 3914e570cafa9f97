"""Generation entry point: `python examples/generate.py --load DIR --prompt TEXT [--max-new-tokens N]`, or
`--mqar N` for recall through generation. Same as the `linear-moe-generate` console script."""
import sys

from linear_moe.cli import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
