"""`python -m segexec_jax.aot`: compile the training step, prefill and decode for a TPU slice on
any machine, and report memory per chip (`segexec_jax.evaluation.aot`)."""

import sys

from .evaluation.aot import main

if __name__ == "__main__":
    sys.exit(main())
