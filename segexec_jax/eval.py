"""`python -m segexec_jax.eval`: the long-context evaluation suite (`segexec_jax.evaluation.suite`)."""

import sys

from .evaluation.suite import main

if __name__ == "__main__":
    sys.exit(main())
