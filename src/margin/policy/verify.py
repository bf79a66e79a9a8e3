"""Should a cascade escalate? The decision on a learned verifier's two probabilities. Pure: numbers
in, a verdict out; no I/O, standard library only.

The cheap model has answered. A learned verifier gives ``p_cheap_ok`` (this answer is right, judged
from the question and the answer) and ``p_strong_ok`` (the stronger model would answer right,
judged from the question). Escalating costs one strong call and gains ``p_strong_ok - p_cheap_ok``
in expected quality, so the cascade escalates when that gain exceeds ``threshold``: the operating
point, chosen on calibration data for a quality target (e.g. 95% of the strong model's quality).
"""

from __future__ import annotations


class VerifyError(ValueError):
    """Probabilities outside 0..1 or a threshold that is not a number."""


def expected_gain(p_cheap_ok: float, p_strong_ok: float) -> float:
    for name, p in (("p_cheap_ok", p_cheap_ok), ("p_strong_ok", p_strong_ok)):
        if not 0.0 <= p <= 1.0:
            raise VerifyError(f"{name} must be in 0..1, got {p!r}")
    return p_strong_ok - p_cheap_ok


def escalate(p_cheap_ok: float, p_strong_ok: float, threshold: float) -> bool:
    """True: discard the cheap answer and ask the stronger model."""
    return expected_gain(p_cheap_ok, p_strong_ok) > threshold


def verdict(p_cheap_ok: float, p_strong_ok: float, threshold: float) -> tuple[bool, str]:
    """(accepted, why) in the shape of ``margin.policy.cascade.verify``: accepted = do not escalate."""
    gain = expected_gain(p_cheap_ok, p_strong_ok)
    up = gain > threshold
    why = (f"learned verifier: p(cheap right)={p_cheap_ok:.2f}, p(strong right)={p_strong_ok:.2f}, "
           f"gain {gain:+.2f} {'>' if up else '<='} {threshold:+.2f}")
    return not up, why
