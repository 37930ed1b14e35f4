"""ARN: its losses on known inputs, where each loss's gradient goes, and a run on real crops that is killed,
resumed and exported to a model the edge embedder loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from trainer_runs import crash_after, epochs, export_parity, records, resume, tiny_config

from crossview.trainer.config import TrainConfig, load_train_config
from crossview.trainer.data.loader import PKSampler
from crossview.trainer.data.samples import Sample
from crossview.trainer.engine import pk_plan
from crossview.trainer.methods import METHODS
from crossview.trainer.methods.arn import reconstruction
from crossview.trainer.modeling.arn import ArnOutputs
from crossview.trainer.modeling.embedding_losses import contrastive, difference
from crossview.trainer.modeling.losses import Batch


def test_difference_loss_is_zero_for_orthogonal_features_and_blind_to_their_scale():
    shared = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    private = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])  # uncorrelated with `shared` over the batch
    assert difference(shared, private).item() == pytest.approx(0.0, abs=1e-12)
    same = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    # Centred, unit rows: Hcᵀ Hp = Σ 1·1 = 4 over the batch, one entry, so the mean square is 16.
    assert difference(same, same).item() == pytest.approx(16.0)
    assert difference(10 * same, 0.1 * same).item() == pytest.approx(16.0)


def test_contrastive_loss_pulls_same_identity_and_pushes_others_inside_the_margin():
    labels = torch.tensor([0, 0, 1])
    far = torch.tensor([[0.0], [1.0], [3.0]])  # pairs: same at 1 → 1; others at 3 and 2, outside m = 2 → 0
    assert contrastive(far, labels, margin=2.0).item() == pytest.approx(1 / 3)
    near = torch.tensor([[0.0], [1.0], [1.5]])  # others at 1.5 and 0.5 → (0.5)² and (1.5)²
    assert contrastive(near, labels, margin=2.0).item() == pytest.approx((1 + 0.25 + 2.25) / 3)


def _outputs(rebuilt_s, rebuilt_t, original) -> ArnOutputs:
    e = torch.zeros(len(original), 2)
    return ArnOutputs(e, e, e, e, e, rebuilt_s, rebuilt_t, original)


def test_reconstruction_uses_each_domains_own_private_path():
    original = torch.full((4, 3, 2, 2), 2.0)
    out = _outputs(torch.zeros_like(original), torch.ones_like(original), original)
    # Rows 0-1 are source, rebuilt through E_S (error 2), rows 2-3 target through E_T (error 1).
    assert reconstruction(out, 2, "features").item() == pytest.approx((4 + 1) / 2)  # Eq. 3, squared
    assert reconstruction(out, 2, "image").item() == pytest.approx((2 + 1) / 2)  # the authors' L1


def _cfg(**arn) -> TrainConfig:
    return TrainConfig.model_validate({
        "method": "arn", "name": "t", "source": {"kind": "folders", "root": "s"},
        "target": {"kind": "images", "root": "t"}, "input": {"height": 64, "width": 32},
        "model": {"backbone": "mobilenet_v2", "pretrained": "none", "embedding_dim": 32}, "arn": arn,
    })


def _touched(net, loss: torch.Tensor) -> set[str]:
    """The top-level modules whose parameters get a non-zero gradient from `loss`."""
    net.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {name.split(".")[0] for name, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_each_loss_reaches_exactly_its_modules():
    torch.manual_seed(0)
    method = METHODS["arn"](_cfg())
    net = method.build(3).train()
    x = torch.randn(8, 3, 64, 32)
    batch = Batch(x, 4, torch.tensor([0, 0, 1, 1]))
    out = net(x)
    s = batch.n_source
    parts = {
        "cls": torch.nn.functional.cross_entropy(out.logits[:s], batch.source_ids),
        "ctrs": contrastive(out.e_c[:s], batch.source_ids),
        "rec": reconstruction(out, s, "features"),
        "diff": difference(out.e_c_free[:s], out.e_s[:s]) + difference(out.e_c_free[s:], out.e_t[s:]),
    }
    reach = {name: _touched(net, loss) for name, loss in parts.items()}
    assert reach["cls"] == {"trunk", "shared", "classifier"}
    assert reach["ctrs"] == {"trunk", "shared"}  # E_I moves only with the source's identities (paper Sec. 4.3)
    assert reach["rec"] == {"shared", "source_private", "target_private", "decoder"}
    assert reach["diff"] == {"shared", "source_private", "target_private"}

    total, terms = method.losses(out, batch)
    assert set(terms) == {"cls", "ctrs", "rec", "diff"}  # mmd is weighted 0 by default: computed, not reported
    assert terms["diff"] == pytest.approx(1500 * parts["diff"].item(), rel=1e-5)
    net.zero_grad(set_to_none=True)
    total.backward()
    assert all(p.grad is not None for p in net.parameters())  # DDP runs without the unused-parameter search


def test_a_source_only_batch_and_the_ablations_still_reach_every_parameter():
    x = torch.randn(4, 3, 64, 32)
    for cfg in (_cfg(), _cfg(private=False, rec=0.0), _cfg(reconstruct="image", mmd=0.1)):
        method = METHODS["arn"](cfg)
        net = method.build(2).train()
        total, terms = method.losses(net(x), Batch(x, 4, torch.tensor([0, 0, 1, 1])))
        total.backward()
        assert torch.isfinite(total) and all(p.grad is not None for p in net.parameters())
        assert ("diff" in terms) == cfg.arn.private and ("rec" in terms) == (cfg.arn.rec > 0)


def test_an_unlabelled_target_is_drawn_as_pk_distinct_images():
    target = [Sample(f"t{i}.jpg", -1, 0) for i in range(40)]
    samples, p, k = pk_plan(target, 4, 4, by_class=False)
    assert (p, k) == (16, 1)
    batches = list(PKSampler([s.pid for s in samples], p, k, seed=0))
    assert all(len(b) == len(set(b)) == 16 for b in batches) and len(batches) == 2
    assert pk_plan(target, 4, 4)[1] == 0  # with classes, unlabelled images are never drawn


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """One ARN run on real crops, killed after its first adaptation epoch and resumed: (run folder, ONNX)."""
    tmp = tmp_path_factory.mktemp("arn")
    path = tiny_config(tmp, "arn", model={"embedding_dim": 64}, pretrain={"epochs": 0, "lr": 0.01},
                       adapt={"iterations": 1, "epochs": 2, "lr": 0.01, "backbone_lr_mult": 0.1})
    crash_after(path, "adapt", 1)
    assert epochs(tmp / "run") == [("adapt", 1, 1)]
    return tmp, resume(path)


def test_resume_continues_at_the_next_epoch_with_arns_losses(resumed):
    tmp, _ = resumed
    run = tmp / "run"
    assert epochs(run) == [("adapt", 1, 1), ("adapt", 1, 2)]  # nothing trained twice, nothing skipped
    recs = records(run)
    adapt = [r for r in recs if r["event"] == "epoch"]
    assert all({"cls", "ctrs", "rec", "diff"} <= set(r) and np.isfinite(r["loss"]) for r in adapt)
    assert [r["label"] for r in recs if r["event"] == "eval"] == ["direct transfer", "iteration 1"]
    assert not [r for r in recs if r["event"] == "cluster"]  # no pseudo labels
    assert load_train_config(tmp / "train.yaml").adapt.iterations == 1


def test_export_is_the_shared_encoder_and_the_edge_embedder_matches_torch(resumed):
    tmp, onnx_path = resumed
    diff, dim = export_parity(onnx_path, tmp / "run" / "last.pt", tmp / "cache" / "TUD-Campus")
    assert dim == 64 and diff <= 1e-4  # e_c of E_I + E_C, nothing of the private encoders or the decoder


@pytest.mark.parametrize("name", ["arn.yaml", "arn-gpu.yaml"])
def test_shipped_configs_hold_the_papers_weights_cpu_sized_or_for_a_gpu(name):
    from pathlib import Path

    cfg = load_train_config(Path(__file__).resolve().parents[1] / "configs" / "train" / name)
    assert cfg.method == "arn" and (cfg.arn.ctrs, cfg.arn.rec, cfg.arn.diff) == (0.01, 2.0, 1500.0)
    assert (cfg.arn.mmd, cfg.arn.reconstruct, cfg.arn.private) == (0.0, "features", True)
    assert cfg.pretrain.epochs == 0 and cfg.adapt.iterations == 1 and cfg.target.kind == "harvest"
    gpu = name == "arn-gpu.yaml"
    assert cfg.model.backbone == ("resnet50" if gpu else "mobilenet_v2")
    assert (cfg.input.height, cfg.input.width) == ((384, 128) if gpu else (128, 64))
    assert cfg.adapt.lr * cfg.adapt.backbone_lr_mult == pytest.approx(1e-7 if gpu else 1e-4)  # E_I's rate
