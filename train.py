"""Train a segmented (or full-attention) model: `python train.py --help`."""

import sys

from segexec_jax.train import main

if __name__ == "__main__":
    sys.exit(main())
