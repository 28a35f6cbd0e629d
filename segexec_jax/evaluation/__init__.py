"""Measurement: the long-context evaluation suite and its scoring, calibration of the
long-range heads of a converted model, and the benchmarks."""
