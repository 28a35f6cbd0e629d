"""Generate from a trained checkpoint: `python infer.py --help`."""

import sys

from segexec_jax.inference.infer import main

if __name__ == "__main__":
    sys.exit(main())
