"""Scoring of long-context tasks: exact string matching (RULER's definitions)."""

from __future__ import annotations

from collections.abc import Sequence


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of the gold strings present in the prediction (case-insensitive)."""
    if not answers:
        raise ValueError("no gold answers to score against")
    text = prediction.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def string_match_any(prediction: str, answers: Sequence[str]) -> float:
    """1 if any gold string is present in the prediction (case-insensitive), else 0."""
    if not answers:
        raise ValueError("no gold answers to score against")
    text = prediction.lower()
    return float(any(a.lower() in text for a in answers))
