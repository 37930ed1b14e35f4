"""A model's score calibration: cosine similarity → P(same person), as stored in the model's metadata.

| what        | how                                                                                   |
|-------------|---------------------------------------------------------------------------------------|
| the map     | piecewise linear through knots (cosine increasing, P non-decreasing), flat past the ends: |
|             | monotone by construction, whichever fit made the knots (isotonic, Platt)              |
| apply       | `cal.probability(cosines)` → same-shape float array in (0, 1); `prior=` re-bases it    |
| threshold   | `cal.cosine_at(0.9)`: the lowest cosine with P >= 0.9 (None if never reached)          |
| stored as   | JSON in `crossview.calibration` (`kernel.modelmeta`): `{"v": 1, "method", "cosine", "p", "prior", "fitted"}` |
| read back   | `Calibration.from_json(text, origin)`: `ValueError` naming the origin and what is wrong |
| fitted by   | `crossview.trainer.calibration`, on a site harvest's tracklets                         |

`prior` is the share of same-person pairs the fit was balanced to (0.5: same-person and
different-person pairs weigh alike). A reader whose pairs have another base rate, e.g. one query
against a gallery of N people, passes `prior=` and the odds move by Bayes' rule, the map's shape kept.
Pure numpy, so the edge and the matcher apply it without the trainer.

    >>> cal = Calibration((0.6, 0.8, 0.9), (0.05, 0.5, 0.95))
    >>> [round(float(p), 3) for p in cal.probability([0.5, 0.7, 0.85, 1.0])]
    [0.05, 0.275, 0.725, 0.95]
    >>> round(cal.cosine_at(0.5), 3), cal.cosine_at(0.99)
    (0.8, None)
    >>> Calibration.from_json(cal.to_json(), "m.onnx") == cal
    True
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

SCHEMA_VERSION = 1
METHODS = ("isotonic", "platt")
MAX_KNOTS = 256  # a fit needs tens; the bound keeps a model's metadata small
UNCALIBRATED = "uncalibrated: scores are raw cosine similarity, not probabilities"


@dataclass(frozen=True)
class Calibration:
    cosine: tuple[float, ...]  # knots, strictly increasing, in [-1, 1]
    p: tuple[float, ...]  # P(same person) at each knot, non-decreasing, in (0, 1)
    prior: float = 0.5  # share of same-person pairs in the (weighted) fit
    method: str = "isotonic"
    fitted: dict = field(default_factory=dict, compare=False)  # provenance: harvest, pair counts, date, ...

    def __post_init__(self):
        x, p = np.asarray(self.cosine, np.float64), np.asarray(self.p, np.float64)
        if not (1 <= len(x) == len(p) <= MAX_KNOTS):
            raise ValueError(f"calibration needs 1..{MAX_KNOTS} knots with one P each, got {len(x)} and {len(p)}")
        if not (np.all(np.isfinite(x)) and np.all(np.diff(x) > 0) and x[0] >= -1 and x[-1] <= 1):
            raise ValueError("calibration knots must be finite, strictly increasing cosines in [-1, 1]")
        if not (np.all((p > 0) & (p < 1)) and np.all(np.diff(p) >= 0)):
            raise ValueError("calibration probabilities must be non-decreasing and in (0, 1): the map must be monotone")
        if not 0 < self.prior < 1:
            raise ValueError(f"calibration prior must be in (0, 1), got {self.prior}")
        if self.method not in METHODS:
            raise ValueError(f"calibration method {self.method!r} unknown (known: {', '.join(METHODS)})")

    def probability(self, cosine, prior: float | None = None) -> np.ndarray:
        """P(same person) for each cosine similarity; `prior` moves the odds to the caller's base rate."""
        p = np.interp(np.asarray(cosine, np.float64), self.cosine, self.p)
        if prior is None:
            return p
        shift = _log_odds(_check_prior(prior)) - _log_odds(self.prior)
        return 1 / (1 + np.exp(-(np.log(p / (1 - p)) + shift)))

    def cosine_at(self, probability: float, prior: float | None = None) -> float | None:
        """The lowest cosine whose P reaches `probability`: a threshold in the units the index searches in."""
        if not 0 < probability < 1:
            raise ValueError(f"probability must be in (0, 1), got {probability}")
        if prior is not None:  # the same odds shift as probability(), backwards
            z = _log_odds(probability) - _log_odds(_check_prior(prior)) + _log_odds(self.prior)
            probability = 1 / (1 + math.exp(-z))
        x, p = np.asarray(self.cosine), np.asarray(self.p)
        if probability > p[-1]:
            return None
        k = int(np.argmax(p >= probability))  # first knot at or above
        if k == 0:
            return float(x[0])
        return float(x[k - 1] + (probability - p[k - 1]) / (p[k] - p[k - 1]) * (x[k] - x[k - 1]))

    def to_json(self) -> str:
        return json.dumps({"v": SCHEMA_VERSION, "method": self.method, "cosine": list(self.cosine), "p": list(self.p),
                           "prior": self.prior, "fitted": self.fitted}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, origin: str) -> Calibration:
        try:
            m = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{origin}: calibration is not JSON ({e})") from None
        version = m.get("v") if type(m) is dict else None
        if version != SCHEMA_VERSION:
            raise ValueError(f"{origin}: calibration schema {version!r:.20} not supported (supported: {SCHEMA_VERSION})")
        try:
            return cls(tuple(map(float, m["cosine"])), tuple(map(float, m["p"])), float(m.get("prior", 0.5)),
                       m.get("method", "isotonic"), m.get("fitted") or {})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{origin}: bad calibration ({e})") from None

    def describe(self) -> str:
        def at(p: float) -> str:
            c = self.cosine_at(p)
            return f"at cosine {c:.3f}" if c is not None else f"never (at most {self.p[-1]:.2f})"

        return (f"calibrated ({self.method}, {len(self.cosine)} knots): P(same person) 0.5 {at(0.5)}, 0.9 {at(0.9)} "
                f"(pairs balanced to prior {self.prior:g})")


def describe(calibration: Calibration | None) -> str:
    """One line for logs and the CLI; a model without a calibration says so."""
    return UNCALIBRATED if calibration is None else calibration.describe()


def _check_prior(prior: float) -> float:
    if not 0 < prior < 1:
        raise ValueError(f"prior must be in (0, 1), got {prior}")
    return prior


def _log_odds(p: float) -> float:
    return math.log(p / (1 - p))
