"""Adaptation methods, one module each, behind `trainer.methods.base.Method`; the train YAML's `method:` picks one.

| key    | module  | method                                                                         |
|--------|---------|--------------------------------------------------------------------------------|
| `daam` | `daam`  | DAAM: attention split, k-means++ pseudo labels with Eq. 9 weights (the default) |
| `daal` | `daal`  | DAAL: DAAM's loop with DAAL's attention, GAP heads, DBSCAN and soft labels      |
| `arn`  | `arn`   | ARN: shared / private encoders, decoder; L_cls + L_ctrs + L_rec + L_diff, no pseudo labels |
| `adfl` | `adfl`  | ADFL: attn3-1sum + AF3 branch, GMP, BN neck; softmax + triplet on the source alone |
| `tcap` | `tcap`  | tracklet- and camera-aware: tracklet pseudo labels (swap splits, co-occurrence cannot-links, eps from the k-NN profile), cluster memory + camera proxies |
| `edaan` | `edaan` | EDAAN: attention-guided source → target translation (CycleGAN generators, PatchGAN, masks) + re-ID with the quartet loss, end to end |

A new method is one module with a `Method` subclass, added to `METHODS`.
"""

from __future__ import annotations

from crossview.trainer.methods.adfl import Adfl
from crossview.trainer.methods.arn import Arn
from crossview.trainer.methods.base import Method
from crossview.trainer.methods.daal import Daal
from crossview.trainer.methods.daam import Daam
from crossview.trainer.methods.edaan import Edaan
from crossview.trainer.methods.tcap import Tcap

METHODS: dict[str, type[Method]] = {m.name: m for m in (Daam, Daal, Arn, Adfl, Tcap, Edaan)}
