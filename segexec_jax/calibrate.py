"""`python -m segexec_jax.calibrate`: choose the long-range heads of a converted model (`segexec_jax.evaluation.calibrate`)."""

import sys

from .evaluation.calibrate import main

if __name__ == "__main__":
    sys.exit(main())
