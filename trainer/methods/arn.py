"""ARN (Li et al., CVPRW 2018): shared / private encoders and a decoder, trained on the source and the raw target.

| interface        | ARN                                                                                   |
|------------------|---------------------------------------------------------------------------------------|
| network          | `ArnNet` (`trainer.modeling.arn`): E_I, E_C, E_S / E_T, D_C, C_S                        |
| losses           | Eq. 5: L_cls + α L_ctrs + β L_rec + γ L_diff (+ the authors' MMD), weights `arn.*`       |
| target step      | none: ARN uses no pseudo labels (always False: every iteration trains on)              |
| adaptation draws | the source by identity, the target with no classes (`target_classes=False`): P·K distinct images |
| checkpoint state | nothing beyond the network                                                            |
| export           | E_I + E_C, compared by cosine: the domain-invariant e_c                               |

Choices where the paper and the authors' code (yujheli/ARN) differ, all `arn.*` keys:
- D_C rebuilds the feature map X with L2 (Eq. 3, the paper); `reconstruct: image` rebuilds the input
  image with L1 instead (the code). Either way a mean over elements, so β does not depend on X's size.
- E_C / E_S / E_T are small 3-layer convolutional nets (the paper), not copies of ResNet's layer4.
- The weights are the paper's α 0.01, β 2.0, γ 1500; MMD between source and target e_c is off (`mmd: 0`,
  the code uses 0.1); the contrastive margin is the code's 2 (the paper gives none).
- L_diff is normalised as DSN's code (`embedding_losses.difference`), which is what makes γ = 1500 fit.
- L_ctrs is on the unnormalised source e_c, as Eq. 2 writes it (α is small "to balance the larger value
  of L_ctrs"), over every distinct pair in the batch; L_cls is on the source e_c only.
The paper's per-module learning rates (E_I 1e-7 and only in the first epochs, C_S 2e-3) map onto the
engine's two groups: `backbone_lr_mult` for E_I, `lr` for the rest.

Ablations: `arn.private: false` ("w/o E_S, E_T": D_C rebuilds from e_c alone, no L_diff), `arn.rec: 0`
("w/o L_rec").
"""

from __future__ import annotations

import torch
from torch.nn import functional as F  # noqa: N812

from crossview.trainer.methods.base import AdaptSamples, Method
from crossview.trainer.modeling.arn import ArnNet, ArnOutputs
from crossview.trainer.modeling.embedding_losses import contrastive, difference, mmd


class Arn(Method):
    name = "arn"
    defaults = {
        # No DAAM attention split (the export's metadata records model.attention); 2048-d latents as the paper.
        "model": {"attention": "none", "embedding_dim": 2048},
        # One adaptation iteration holds all of ARN's epochs: it has no step between iterations.
        "pretrain": {"epochs": 0, "lr": 1e-3},
        "adapt": {"iterations": 1, "epochs": 100, "lr": 1e-3, "backbone_lr_mult": 1e-4, "milestones": []},
    }

    def build(self, num_source_ids, pretrained=None) -> ArnNet:
        return ArnNet.from_config(self.cfg, num_source_ids, pretrained)

    def losses(self, out: ArnOutputs, batch):
        a, s = self.cfg.arn, batch.n_source
        has_target = s < out.e_c.shape[0]
        terms = {
            "cls": F.cross_entropy(out.logits[:s].float(), batch.source_ids),
            "ctrs": contrastive(out.e_c[:s], batch.source_ids, a.margin),
            "rec": reconstruction(out, s, a.reconstruct),
        }
        if out.e_s is not None:
            terms["diff"] = difference(out.e_c_free[:s], out.e_s[:s])
            if has_target:
                terms["diff"] = terms["diff"] + difference(out.e_c_free[s:], out.e_t[s:])
        if has_target:
            terms["mmd"] = mmd(out.e_c[:s], out.e_c[s:])
        weights = {"cls": 1.0, "ctrs": a.ctrs, "rec": a.rec, "diff": a.diff, "mmd": a.mmd}
        weighted = {k: weights[k] * v for k, v in terms.items()}
        # Every output joins the graph, x0 where no row or weight uses it (E_T while pre-training, D_C with
        # rec 0): DistributedDataParallel then gets a gradient for every parameter and never waits for one.
        idle = sum((t.float().sum() * 0 for t in out if t is not None), torch.zeros((), device=out.e_c.device))
        total = sum(weighted.values(), idle)
        return total, {k: float(v.detach()) for k, v in weighted.items() if weights[k] != 0}

    def target_step(self, run, model) -> bool:
        return False

    def adapt_samples(self, data) -> AdaptSamples:
        return AdaptSamples(data.source, data.target, torch.ones(len(data.target)), target_classes=False)


def reconstruction(out: ArnOutputs, n_source: int, kind: str) -> torch.Tensor:
    """Eq. 3 as a mean over every image and element: each domain's rows rebuilt through its own private encoder."""
    rebuilt = torch.cat([out.rebuilt_s[:n_source], out.rebuilt_t[n_source:]]).float()
    error = rebuilt - out.original.float()
    return error.abs().mean() if kind == "image" else error.pow(2).mean()
