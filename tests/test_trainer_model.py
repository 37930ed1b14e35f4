"""The DAAM / DAAL network and losses against the papers' equations."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch.nn import functional as F  # noqa: N812

from crossview.trainer.modeling.attention import AttentionSplit, DaalAttention, DaamAttention
from crossview.trainer.modeling.backbones import WeightsUnavailable, build_backbone
from crossview.trainer.modeling.losses import (
    Batch,
    LossWeights,
    domain_similarity,
    soft_label_ce,
    soft_orthogonality,
    total_loss,
    weighted_ce,
)
from crossview.trainer.modeling.network import ReidNet


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("module", [DaamAttention, DaalAttention])
def test_attention_map_is_strictly_inside_0_1_and_full_size(module):
    f = torch.randn(3, 64, 16, 8) * 10  # large activations must not saturate to exactly 0 or 1
    with torch.no_grad():
        a = module(64)(f)
    full = a.expand_as(f)
    assert full.shape == f.shape
    assert float(full.min()) > 0 and float(full.max()) < 1


def test_daam_attention_is_spatial_times_channel():
    """Eq. 3: A = S x C, so every channel's map is the same spatial map scaled per channel."""
    att = DaamAttention(32)
    f = torch.randn(2, 32, 8, 4)
    a = att(f)
    assert a.shape == (2, 32, 8, 4)
    ratio = a / a[:, :1]  # divide out channel 0: what remains is C_c / C_0, constant over space
    assert torch.allclose(ratio, ratio[:, :, :1, :1].expand_as(ratio), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["daam", "daal"])
def test_residual_split_adds_back_to_the_feature_map(kind):
    """Eq. 1-2: F_sh + F_sp = F, with F_sh = A*F."""
    split = AttentionSplit(kind, 64)
    f = torch.randn(2, 64, 8, 4)
    sh, sp = split(f)
    assert torch.allclose(sh + sp, f, atol=1e-6)
    assert torch.allclose(sh, split.shared_map(f))


def test_independent_attention_does_not_add_back_and_none_passes_through():
    f = torch.randn(2, 64, 8, 4)
    sh, sp = AttentionSplit("ia", 64)(f)
    assert not torch.allclose(sh + sp, f, atol=1e-3)
    sh, sp = AttentionSplit("none", 64)(f)
    assert sh is f and sp is f
    with pytest.raises(ValueError, match="unknown attention"):
        AttentionSplit("cbam", 64)


def test_resnet_last_stride_1_doubles_the_final_resolution():
    x = torch.zeros(1, 3, 256, 128)
    s2, c = build_backbone("resnet18", "none", last_stride=2)
    s1, _ = build_backbone("resnet18", "none", last_stride=1)
    assert c == 512
    assert s2(x).shape[-2:] == (8, 4) and s1(x).shape[-2:] == (16, 8)
    r50, c50 = build_backbone("resnet50", "none", last_stride=1)
    assert c50 == 2048 and r50(x).shape[1:] == (2048, 16, 8)


def test_missing_resnet_weights_give_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: torchvision must try the network
    with pytest.raises(WeightsUnavailable, match="could not be downloaded.*model.pretrained"):
        build_backbone("resnet18", "imagenet")
    with pytest.raises(WeightsUnavailable, match="not found"):
        build_backbone("resnet50", tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg16")


def test_resnet_weights_load_from_a_local_file(tmp_path):
    full = torchvision.models.resnet18()
    torch.save(full.state_dict(), tmp_path / "r18.pth")
    loaded, _ = build_backbone("resnet18", tmp_path / "r18.pth")
    assert torch.equal(loaded[0].weight, full.conv1.weight)
    assert torch.equal(loaded[7][1].conv2.weight, full.layer4[1].conv2.weight)


def test_mobilenet_uses_the_offline_imagenet_weights():
    trunk, c = build_backbone("mobilenet_v2", "imagenet")
    rand, _ = build_backbone("mobilenet_v2", "none")
    assert c == 1280 and trunk.training
    assert not torch.equal(trunk[0][0].weight, rand[0][0].weight)


def _net(**kw) -> ReidNet:
    return ReidNet(5, backbone="mobilenet_v2", pretrained="none", **kw)


def test_branch_shapes_and_heads_follow_the_switches():
    x = torch.randn(6, 3, 128, 64)
    net = _net()
    net.set_target_classes(torch.randn(7, 256))
    out = net(x)
    assert out.f_sh.shape == (6, 256) and out.f_sp.shape == (6, 256)
    assert out.source_logits.shape == (6, 5) and out.target_logits.shape == (6, 7)
    assert out.domain_logit.shape == (6,) and out.dsp_logits.shape == (6, 2) and out.grl_logits is None
    assert (out.f_sh >= 0).all()  # DAAM's DSH head ends in a ReLU
    daal = _net(attention="daal", head="gap", dsp=False, domain_loss="none")(x)
    assert daal.f_sh.shape == (6, 1280) and daal.f_sp is None and daal.domain_logit is None
    assert _net(domain_loss="grl")(x).grl_logits.shape == (6, 2)


def test_embedder_is_the_shared_path_only_and_matches_eval_forward():
    net = _net().eval()
    emb = net.embedder()
    x = torch.randn(2, 3, 128, 64)
    assert torch.allclose(emb(x), net(x))
    names = {n for n, _ in emb.named_parameters()}
    assert not any("sp_head" in n or "dsp" in n or "classifier" in n for n in names)


def test_target_classifier_starts_from_the_unit_centres():
    net = _net()
    centers = torch.randn(4, 256) * 3
    net.set_target_classes(centers)
    assert torch.allclose(net.target_classifier.weight, F.normalize(centers, dim=1))


def test_domain_similarity_is_minus_mean_log_p():
    logit = torch.tensor([0.0, 2.0, -1.0])
    expected = -torch.log(torch.sigmoid(logit)).mean()
    assert torch.allclose(domain_similarity(logit), expected)


def test_weighted_ce_weights_each_sample():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    w = torch.tensor([1 / (1 + math.e), 0.5])  # Eq. 9 for ||f - C||^2 = 1 and 0
    ce = F.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(weighted_ce(logits, labels, w), (w * ce).mean())
    assert torch.allclose(weighted_ce(logits, labels, torch.ones(2)), F.cross_entropy(logits, labels))


def test_soft_label_ce_is_daal_eq5():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    soft = torch.tensor([[0.95, 0.03, 0.02]])
    p = torch.softmax(logits, dim=1)
    assert torch.allclose(soft_label_ce(logits, soft), -(soft * p.log()).sum())


def test_soft_orthogonality_is_eq11():
    a = torch.tensor([[1.0, 2.0, 0.0]])
    b = torch.tensor([[2.0, 0.0, 1.0]])
    assert torch.allclose(soft_orthogonality(a, b), torch.tensor(2.0 / (5.0 * 5.0)))
    assert float(soft_orthogonality(a, torch.tensor([[0.0, 0.0, 3.0]]))) == 0.0


def test_grl_reverses_the_gradient_into_the_features():
    net = _net(domain_loss="grl")
    x = torch.randn(4, 3, 128, 64)
    out = net(x)
    f = out.f_sh
    f.retain_grad()
    F.cross_entropy(out.grl_logits, torch.tensor([0, 0, 1, 1])).backward()
    # The same loss computed without the GRL pushes f_sh the opposite way.
    f2 = f.detach().requires_grad_()
    F.cross_entropy(net.domain_head(f2), torch.tensor([0, 0, 1, 1])).backward()
    assert torch.allclose(f.grad, -f2.grad, atol=1e-6)


def test_total_loss_terms_follow_weights_and_stage():
    net = _net()
    net.set_target_classes(torch.randn(3, 256))
    x = torch.randn(8, 3, 128, 64)
    out = net(x)
    b = Batch(x, 4, torch.randint(0, 5, (4,)), torch.randint(0, 3, (4,)), torch.rand(4))
    total, terms = total_loss(out, b, LossWeights())
    assert set(terms) == {"reid_s", "reid_t", "ds", "dsp", "orth"}
    assert math.isclose(float(total), sum(terms.values()), rel_tol=1e-5)
    _, no_orth = total_loss(out, b, LossWeights(orth=0, ds=0))
    assert set(no_orth) == {"reid_s", "reid_t", "dsp"}
    src = Batch(x[:4], 4, b.source_ids)  # pre-training: source only, L_ReIDs alone (Alg. 1 line 1)
    _, pre = total_loss(net(x[:4]), src, LossWeights())
    assert set(pre) == {"reid_s"}
    assert b.domains.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
