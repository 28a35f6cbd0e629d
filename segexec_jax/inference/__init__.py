"""Inference: the decode caches, prefill and decode steps, `generate`, and the `infer.py`
command line."""
