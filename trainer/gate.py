"""The adapt job's gate: is the candidate model better on this site than the one running, without forgetting the source?

| score          | how                                                                                   |
|----------------|---------------------------------------------------------------------------------------|
| site mAP       | tracklet re-identification on tracklets held out of training: each tracklet is an identity, |
|                | its crops before the middle of its time span are queries, those after it the gallery, with |
|                | `min_gap_s` between the two (neighbouring frames are near copies and would flatter both) |
| site ECE       | a calibration fitted on the training harvest's tracklets, scored on the held-out pairs    |
|                | (same tracklet far apart vs co-occurring tracks: `trainer.calibration.make_pairs`)    |
| source mAP     | `crossview eval` on the labelled source's held-out query/gallery split               |
| decision       | pass when site mAP gains at least `min_gain`, source mAP falls by at most `max_source_drop` and |
|                | ECE rises by at most `max_ece_rise`; each reason for a refusal is named                 |
| report         | `GateReport.to_dict()` (JSON, stored with the model in the registry) and `.to_markdown()` |

Two tracklets of one person (the tracker lost and found them) count as different identities here: a
miss for both models alike, so the comparison stays fair, though the absolute mAP reads low.

    cur = score_model(Path("current.onnx"), holdout, train_harvest, source)
    new = score_model(Path("candidate.onnx"), holdout, train_harvest, source)
    report = decide(new, cur, GateRule(min_gain=0.01))
    report.passed, report.reasons
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from crossview.kernel.embedder import Embedder
from crossview.trainer.calibration import Tracklet, expected_calibration_error, fit_map, make_pairs, read_tracklets
from crossview.trainer.eval_onnx import embed_samples, evaluate_onnx
from crossview.trainer.evaluation import evaluate

log = logging.getLogger(__name__)

MAX_QUERIES_PER_TRACKLET = 5  # a long tracklet would otherwise outweigh the short ones in the mean


@dataclass(frozen=True)
class Source:
    """The labelled source whose held-out split the candidate must not forget."""

    kind: str
    root: Path
    cache_dir: Path = Path("runs/cache")


@dataclass(frozen=True)
class Scores:
    model: str  # its version
    site_mAP: float
    site_rank1: float
    site_queries: int
    site_ece: float | None  # None: too few held-out pairs to score calibration on
    source_mAP: float | None  # None: no source to score on


@dataclass(frozen=True)
class GateRule:
    min_gain: float = 0.01
    max_source_drop: float = 0.02
    max_ece_rise: float = 0.05


@dataclass(frozen=True)
class GateReport:
    candidate: Scores
    current: Scores
    rule: GateRule
    passed: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "reasons": self.reasons, "rule": asdict(self.rule),
                "candidate": asdict(self.candidate), "current": asdict(self.current)}

    def to_markdown(self) -> str:
        def cell(v):
            return "–" if v is None else f"{100 * v:.1f}"

        rows = [("site mAP (held-out tracklets)", "site_mAP"), ("site rank-1", "site_rank1"),
                ("site ECE (held-out pairs)", "site_ece"), ("source mAP (held-out split)", "source_mAP")]
        lines = [f"| | current `{self.current.model}` | candidate `{self.candidate.model}` |", "|---|---:|---:|"]
        lines += [f"| {name} | {cell(getattr(self.current, key))} | {cell(getattr(self.candidate, key))} |"
                  for name, key in rows]
        verdict = "**passed**: promote" if self.passed else "**refused**: " + "; ".join(self.reasons)
        rule = self.rule
        return "\n".join([*lines, "", f"Gate (gain ≥ {100 * rule.min_gain:.1f} mAP points on the site, source drop ≤ "
                          f"{100 * rule.max_source_drop:.1f}, ECE rise ≤ {100 * rule.max_ece_rise:.1f}): {verdict}", ""])


def split_tracklets(tracklets: list[Tracklet], holdout: float, seed: int = 0) -> tuple[list[Tracklet], list[Tracklet]]:
    """(train, held out) by whole tracklets, so no person's tracklet is on both sides; at least one each."""
    if len(tracklets) < 2:
        raise ValueError(f"{len(tracklets)} tracklet(s) harvested: the gate needs some to train on and some to hold out")
    order = np.random.default_rng(seed).permutation(len(tracklets))
    n = min(len(tracklets) - 1, max(1, round(holdout * len(tracklets))))
    held = set(order[:n].tolist())
    return ([t for i, t in enumerate(tracklets) if i not in held], [t for i, t in enumerate(tracklets) if i in held])


def _query_gallery(tracklets: list[Tracklet], min_gap_s: float) -> tuple[list[int], list[int], list[int], list[int]]:
    """Rows of queries and gallery crops, with their tracklet labels: before and after each tracklet's middle."""
    q_rows, q_ids, g_rows, g_ids = [], [], [], []
    for label, t in enumerate(tracklets):
        mid = (t.ts.min() + t.ts.max()) / 2
        early = t.rows[t.ts <= mid - min_gap_s / 2]
        late = t.rows[t.ts >= mid + min_gap_s / 2]
        g_rows += late.tolist()
        g_ids += [label] * len(late)
        if len(early) and len(late):
            picked = early[np.linspace(0, len(early) - 1, min(len(early), MAX_QUERIES_PER_TRACKLET)).astype(int)]
            q_rows += picked.tolist()
            q_ids += [label] * len(picked)
    return q_rows, q_ids, g_rows, g_ids


def tracklet_map(features: np.ndarray, tracklets: list[Tracklet], min_gap_s: float) -> dict:
    """mAP and rank-1 of held-out tracklets finding their own later crops among every tracklet's later crops."""
    q_rows, q_ids, g_rows, g_ids = _query_gallery(tracklets, min_gap_s)
    if not q_rows:
        raise ValueError(f"no held-out tracklet spans more than {min_gap_s:g} s: nothing to score the site on; "
                         "harvest longer or lower gate.min_gap_s")
    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    dist = 1 - f[q_rows] @ f[g_rows].T
    # Queries and gallery are one camera's crops: distinct camera labels keep the Market protocol from dropping them.
    result = evaluate(dist, np.asarray(q_ids), np.asarray(g_ids), np.zeros(len(q_ids)), np.ones(len(g_ids)))
    return {"mAP": result.mAP, "rank1": result.rank(1), "queries": result.valid_queries}


def _ece(features: np.ndarray, fit: list[Tracklet], held: list[Tracklet], min_gap_s: float) -> float | None:
    """ECE on the held-out pairs of a map fitted on the training pairs; None when either side has too few."""
    try:
        fit_pairs, held_pairs = make_pairs(fit, min_gap_s), make_pairs(held, min_gap_s)
        knots, p = fit_map(fit_pairs.cosines(features), fit_pairs)
    except ValueError as e:
        log.warning("gate: no calibration score (%s)", e)
        return None
    prob = np.interp(held_pairs.cosines(features), knots, p)
    return expected_calibration_error(prob, held_pairs.label, held_pairs.weight)


def score_model(model: Path, harvest: Path, held: list[Tracklet], fit: list[Tracklet], source: Source | None,
                min_gap_s: float = 2.0) -> Scores:
    """Every gate score of `model`; `held` / `fit` are tracklets of `read_tracklets(harvest)`."""
    crops, _ = read_tracklets(harvest)
    embedder = Embedder(model)  # on the job's GPU when it has one
    log.info("gate: scoring %s on %d held-out tracklets", embedder.version, len(held))
    features = embed_samples(embedder, crops)
    site = tracklet_map(features, held, min_gap_s)
    source_map = None
    if source is not None:
        source_map = evaluate_onnx(model, source.kind, source.root, source.cache_dir)["mAP"]
    return Scores(embedder.version, site["mAP"], site["rank1"], site["queries"], _ece(features, fit, held, min_gap_s),
                  source_map)


def decide(candidate: Scores, current: Scores, rule: GateRule) -> GateReport:
    """Promote only a clear gain on the site that costs little on the source and on calibration."""
    reasons = []
    gain = candidate.site_mAP - current.site_mAP
    if gain < rule.min_gain:
        reasons.append(f"site mAP {100 * candidate.site_mAP:.1f} vs {100 * current.site_mAP:.1f}: gain "
                       f"{100 * gain:+.1f} < {100 * rule.min_gain:.1f} points")
    if candidate.source_mAP is not None and current.source_mAP is not None:
        drop = current.source_mAP - candidate.source_mAP
        if drop > rule.max_source_drop:
            reasons.append(f"source mAP fell {100 * drop:.1f} points (at most {100 * rule.max_source_drop:.1f})")
    if candidate.site_ece is not None and current.site_ece is not None:
        rise = candidate.site_ece - current.site_ece
        if rise > rule.max_ece_rise:
            reasons.append(f"calibration error rose {rise:.3f} (at most {rule.max_ece_rise:.3f})")
    return GateReport(candidate, current, rule, not reasons, reasons)
