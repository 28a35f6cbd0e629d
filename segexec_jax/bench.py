"""`python -m segexec_jax.bench`: prefill, decode and training benchmarks (`segexec_jax.evaluation.bench`)."""

import sys

from .evaluation.bench import main

if __name__ == "__main__":
    sys.exit(main())
