"""DAAL (Huang et al.): DAAM's loop with DAAL's attention, plain-GAP heads, DBSCAN and soft labels.

| differs from DAAM in     | DAAL's setting (`defaults`)                                             |
|--------------------------|-------------------------------------------------------------------------|
| attention, heads         | `model.attention: daal` (sequential spatial → channel), `model.head: gap` |
| losses (Eq. 7)           | L_cro + L_DSP: `model.domain_loss: none`, `loss.ds: 0`, `loss.orth: 0`    |
| pseudo labels            | DBSCAN on the k-reciprocal distance (`clustering.method: dbscan`) |
| target loss (Eq. 4-5)    | soft labels, `loss.target: soft`                                         |

Everything else, the network, losses and the step between iterations, is DAAM's: those already follow
these switches. Any of them set in the train YAML wins over these defaults.
"""

from __future__ import annotations

from crossview.trainer.methods.daam import Daam


class Daal(Daam):
    name = "daal"
    defaults = {
        "model": {"attention": "daal", "head": "gap", "domain_loss": "none"},
        "loss": {"ds": 0.0, "orth": 0.0, "target": "soft"},
        "clustering": {"method": "dbscan"},  # p 0.0016 and M 4, the paper's, are the clustering defaults
    }
