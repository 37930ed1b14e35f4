"""ADFL: the attention's equations on small tensors, where its losses reach, a source-only run on real crops that
is killed and resumed (backbone frozen for its first epoch), the export on the edge, and ADFL as another method's
pre-training."""

from __future__ import annotations

import pytest
import torch
from trainer_runs import crash_after, epochs, export_parity, records, resume, tiny_config

from crossview.kernel import checkpoint
from crossview.trainer.config import TrainConfig, load_train_config
from crossview.trainer.methods import METHODS
from crossview.trainer.modeling.adfl import Attn1Sum, ChannelAttention, SpatialAttention
from crossview.trainer.modeling.backbones import mobilenet_v2_imagenet
from crossview.trainer.modeling.embedding_losses import batch_hard_triplet
from crossview.trainer.modeling.losses import Batch
from crossview.trainer.modeling.network import ReidNet


def test_attention_starts_as_the_identity_with_alpha_and_beta_at_zero():
    m = Attn1Sum(16)
    assert m.spatial.alpha.item() == 0 and m.channel.beta.item() == 0
    x = torch.randn(2, 16, 6, 4)
    assert torch.equal(m(x), x)


def test_attention_maps_are_distributions_even_where_a_naive_softmax_overflows():
    x = 30 * torch.randn(2, 1024, 4, 2)  # a ResNet stage-3 width; I·Iᵀ reaches ~7,000
    energy = torch.bmm(x.flatten(2), x.flatten(2).transpose(1, 2))
    assert torch.isinf(torch.exp(energy)).any()  # what a softmax without the max subtracted would meet
    for a in (ChannelAttention.attention(x), SpatialAttention(1024).attention(x)):
        assert torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
        assert torch.allclose(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-5)
    m = Attn1Sum(1024)
    with torch.no_grad():
        m.spatial.alpha.fill_(1.0), m.channel.beta.fill_(1.0)
        out = m(x)
        # "1sum": both attention terms, and the input added once (not once per branch).
        assert torch.allclose(out, m.spatial.attend(x) + m.channel.attend(x) + x, atol=1e-3)
        assert torch.isfinite(out).all()
        assert torch.isfinite(m(x.half())).all()  # fp16 in (as under AMP): the energies are taken in float32


def test_batch_hard_triplet_on_known_points():
    f = torch.tensor([[0.0], [1.0], [3.0], [5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # Anchors: 0 → pos 1, neg 3: 0.3+1-3 < 0; 1 → pos 1, neg 2: 0.3-1 < 0; 3 → pos 2, neg 2: 0.3; 5 → pos 2, neg 4: 0.
    assert batch_hard_triplet(f, labels, margin=0.3).item() == pytest.approx(0.3 / 4)


def _cfg(**model) -> TrainConfig:
    return TrainConfig.model_validate({
        "method": "adfl", "name": "t", "source": {"kind": "folders", "root": "s"},
        "target": {"kind": "images", "root": "t"}, "adfl": {"af_dim": 16},
        "model": {"backbone": "mobilenet_v2", "pretrained": "none", **model},
    })


def _touched(net, loss) -> set[str]:
    net.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def _modules(names: set[str]) -> set[str]:
    return {".".join(n.split(".")[:2]) if n.startswith("trunk.") else n.split(".")[0] for n in names}


def test_softmax_and_triplet_reach_their_modules_and_the_attention_through_alpha_and_beta():
    torch.manual_seed(0)
    method = METHODS["adfl"](_cfg())
    net = method.build(4).train()
    x = torch.randn(8, 3, 64, 32)
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = net(x)
    softmax = torch.nn.functional.cross_entropy(out.logits, ids)
    triplet = batch_hard_triplet(out.neck, ids)
    assert _modules(_touched(net, softmax)) == {"trunk.early", "trunk.attn", "trunk.late", "af3", "neck", "classifier"}
    assert _modules(_touched(net, triplet)) == {"trunk.early", "trunk.attn", "trunk.late", "af3", "neck"}
    # At α = β = 0 only the scales themselves learn; Q, K and V start once α has moved.
    assert {n for n in _touched(net, softmax) if ".attn." in n} == {"trunk.attn.spatial.alpha", "trunk.attn.channel.beta"}
    with torch.no_grad():
        net.trunk.attn.spatial.alpha.fill_(0.5)
    qkv = {n for n in _touched(net, torch.nn.functional.cross_entropy(net(x).logits, ids)) if ".attn.spatial." in n}
    assert {"trunk.attn.spatial.query.weight", "trunk.attn.spatial.key.weight", "trunk.attn.spatial.value.weight"} <= qkv

    total, terms = method.losses(out, Batch(x, 8, ids))
    assert set(terms) == {"softmax", "triplet"} and total.item() == pytest.approx(softmax.item() + triplet.item())


def test_the_baseline_has_no_attention_and_no_af3_branch():
    net = METHODS["adfl"](_cfg(attn3="none")).build(4)
    assert net.af3 is None and net.dim == 1280 and not any("attn" in n for n, _ in net.named_parameters())


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """An ADFL run on real crops (2 epochs, backbone frozen for the first), killed after epoch 1 and resumed."""
    tmp = tmp_path_factory.mktemp("adfl")
    path = tiny_config(tmp, "adfl", adfl={"af_dim": 32},
                       pretrain={"epochs": 2, "lr": 3.5e-4, "warmup_epochs": 1, "freeze_backbone_epochs": 1})
    crash_after(path, "pretrain", 1)
    frozen = checkpoint.load(tmp / "run" / "last.pt").model
    return tmp, frozen, resume(path)


def test_the_backbone_stays_frozen_while_the_new_modules_learn(resumed):
    _, frozen, _ = resumed
    imagenet = mobilenet_v2_imagenet().state_dict()
    weights = [k for k in imagenet if k.endswith(".weight") and imagenet[k].dim() == 4]  # every conv of the backbone
    early = {k: f"trunk.early.{k}" for k in weights if int(k.split(".")[0]) < 14}
    assert early and all(torch.equal(frozen[v], imagenet[k]) for k, v in early.items())
    assert frozen["trunk.attn.spatial.alpha"].item() != 0  # the attention is new: it learns from epoch 1


def test_resume_continues_at_the_next_epoch_and_only_evaluates_direct_transfer(resumed):
    tmp, _, _ = resumed
    run = tmp / "run"
    assert epochs(run) == [("pretrain", 0, 1), ("pretrain", 0, 2)]
    recs = records(run)
    assert all({"softmax", "triplet"} <= set(r) for r in recs if r["event"] == "epoch")
    (ev,) = [r for r in recs if r["event"] == "eval"]
    assert ev["label"] == "direct transfer" and 0 < ev["mAP"] <= 1  # never adapted: the target is only evaluated


def test_export_with_flip_averaging_loads_on_the_edge(resumed):
    tmp, _, onnx_path = resumed
    diff, dim = export_parity(onnx_path, tmp / "run" / "last.pt", tmp / "cache" / "TUD-Campus")
    assert dim == 1280 + 32 and diff <= 1e-4


def test_an_adfl_checkpoint_starts_another_methods_trunk(resumed, tmp_path):
    tmp, _, _ = resumed
    ckpt = tmp / "run" / "last.pt"
    daam = load_train_config(tiny_config(tmp_path, "daam", model={"attn3": "1sum", "init_from": str(ckpt)}))
    net = ReidNet.from_config(daam.model, 5)
    trained = checkpoint.load(ckpt).model
    assert all(torch.equal(v, trained[f"trunk.{k}"]) for k, v in net.trunk.state_dict().items())
    plain = load_train_config(tiny_config(tmp_path, "daam", model={"init_from": str(ckpt)}))
    with pytest.raises(ValueError, match=r"last.pt: its trunk does not fit this model \(check model.backbone and model.attn3\)"):
        ReidNet.from_config(plain.model, 5)


@pytest.mark.parametrize("name", ["adfl.yaml", "adfl-gpu.yaml"])
def test_shipped_configs_hold_the_papers_schedule_cpu_sized_or_for_a_gpu(name):
    from pathlib import Path

    cfg = load_train_config(Path(__file__).resolve().parents[1] / "configs" / "train" / name)
    assert cfg.method == "adfl" and cfg.model.attn3 == "1sum" and cfg.adapt.iterations == 0
    assert (cfg.optim.kind, cfg.optim.weight_decay, cfg.pretrain.lr) == ("adam", 5e-4, 3.5e-4)
    assert (cfg.sampler.p, cfg.sampler.k, cfg.adfl.flip_test, cfg.adfl.softmax, cfg.adfl.triplet) == (8, 4, True, 1, 1)
    if name == "adfl-gpu.yaml":
        assert (cfg.model.backbone, cfg.model.last_stride, cfg.input.height, cfg.input.width) == ("resnet50", 1, 384, 128)
        p = cfg.pretrain
        assert (p.epochs, p.freeze_backbone_epochs, p.warmup_epochs, p.milestones) == (150, 5, 20, [80, 130])
        assert cfg.adfl.af_dim == 1024
    else:
        assert cfg.model.backbone == "mobilenet_v2" and cfg.pretrain.epochs < 150
