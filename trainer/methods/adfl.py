"""ADFL (Liu et al. 2019): attention-based discriminative feature learning, trained on the source alone.

| interface        | ADFL                                                                                  |
|------------------|---------------------------------------------------------------------------------------|
| network          | `AdflNet` (`trainer.modeling.adfl`): AF3-cat-`adfl.af_dim`-attn3-1sum, GMP, BN neck; `model.attn3: none` is the paper's baseline |
| losses           | softmax + batch-hard triplet, 1:1 (`adfl.softmax`, `adfl.triplet`), both on the BN neck |
| target step      | none: ADFL is domain generalisation, it never sees the target (`adapt.iterations: 0`)  |
| checkpoint state | nothing beyond the network                                                            |
| export           | the BN-neck feature (backbone ‖ AF3), averaged with the mirror image's (`adfl.flip_test`) |

The run is the pre-training stage alone, then "direct transfer" is its evaluation on the target. Its
checkpoint is a starting point for the adapting methods: `model.attn3: 1sum` gives their trunk the same
attention after stage 3, and `model.init_from: <this run>/last.pt` loads the trained trunk into it.

The paper's schedule (configs/train/adfl.yaml): Adam (`optim.kind: adam`) at 3.5e-4, weight decay 5e-4,
150 epochs, the backbone frozen for 5 (`pretrain.freeze_backbone_epochs`), a 20-epoch linear warm-up
(the engine's warm-up starts at lr/20, the paper's at 3e-6 = lr/117), x0.1 at epochs 80 and 130.
"""

from __future__ import annotations

from torch.nn import functional as F  # noqa: N812

from crossview.trainer.methods.base import Method
from crossview.trainer.modeling.adfl import AdflNet, AdflOutputs
from crossview.trainer.modeling.embedding_losses import batch_hard_triplet


class Adfl(Method):
    name = "adfl"
    defaults = {
        "model": {"attn3": "1sum", "attention": "none"},  # its attention is attn3, not DAAM's split
        "optim": {"kind": "adam"},
        "pretrain": {"epochs": 150, "lr": 3.5e-4, "milestones": [80, 130], "warmup_epochs": 20,
                     "freeze_backbone_epochs": 5},
        "adapt": {"iterations": 0, "epochs": 0, "lr": 3.5e-4},
    }

    def build(self, num_source_ids, pretrained=None) -> AdflNet:
        m, a = self.cfg.model, self.cfg.adfl
        return AdflNet(num_source_ids, m.backbone, pretrained or m.pretrained, m.last_stride, a.af_dim, a.flip_test,
                       m.attn3)

    def losses(self, out: AdflOutputs, batch):
        a, s = self.cfg.adfl, batch.n_source
        terms = {"softmax": a.softmax * F.cross_entropy(out.logits[:s].float(), batch.source_ids),
                 "triplet": a.triplet * batch_hard_triplet(out.neck[:s], batch.source_ids, a.margin)}
        return sum(terms.values()), {k: float(v.detach()) for k, v in terms.items()}

    def target_step(self, run, model) -> bool:
        return True  # nothing to adapt: stop before any adaptation epoch

    def adapt_samples(self, data):
        raise RuntimeError("ADFL trains on the source only; it draws no adaptation batches")
