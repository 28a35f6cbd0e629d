"""Train a segmented (or full-attention) model: `python train.py --help`."""

import os
import signal
import sys


def _interrupted_while_starting(signum, frame):
    # Ctrl-C while the libraries load (before training installs its own handler): one line,
    # no traceback; nothing was trained yet, so nothing is lost
    sys.stderr.write("interrupted while starting: exiting without saving a checkpoint\n")
    os._exit(130)


if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (an ignored SIGINT stays ignored)
        signal.signal(signal.SIGINT, _interrupted_while_starting)
    from segexec_jax.training.loop import main

    sys.exit(main())
