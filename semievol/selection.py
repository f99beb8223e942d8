"""Knowledge adaptive selection (paper section 3.4): keep the pseudo-labels the warm model
is confident about. Entropy of a pseudo-response is its mean negative token log-probability
(eq. 6, computed in `Generation.entropy`); the threshold is the theta-percentile of the
entropies over all pseudo-responses (eq. 7); kept are those strictly under it (eq. 8), or
all of them when theta is 1.

``per_class`` takes the percentile within each pseudo-label class instead. A model is often
surest of the majority class: on fpb with 64 labels every pseudo-label under the global
threshold was "neutral", and evolving on them taught the model to answer nothing else.
Per class, the selected set keeps the classes in their mined proportions."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .types import PseudoLabel


def threshold(entropies: Sequence[float], theta: float) -> float:
    """tau = Percentile_theta of the entropies (linear interpolation); inf when empty."""
    finite = [h for h in entropies if h is not None and math.isfinite(h)]
    if not finite:
        return math.inf
    return float(np.percentile(finite, 100 * theta))


def select(records: Sequence[PseudoLabel], theta: float, *, adaptive: bool = True,
           per_class: bool = False) -> tuple[list[PseudoLabel], float]:
    """The records to train on, and the (global) threshold. Records without a pseudo-label
    are never kept; without adaptive selection every labeled record is."""
    labeled = [r for r in records if r.pseudo_label is not None]
    if not adaptive:
        return labeled, math.inf
    tau = threshold([r.entropy for r in labeled], theta)
    if per_class:
        classes = {r.pseudo_label for r in labeled}
        kept = {r.id for c in classes
                for r in select([r for r in labeled if r.pseudo_label == c], theta)[0]}
        return [r for r in labeled if r.id in kept], tau
    if theta >= 1:
        return [r for r in labeled if r.entropy is not None], tau
    return [r for r in labeled if r.entropy is not None and r.entropy < tau], tau
