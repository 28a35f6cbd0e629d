"""Training: the loop (`train.py`), the optimizer, checkpoints that restore bit for bit, metrics."""
