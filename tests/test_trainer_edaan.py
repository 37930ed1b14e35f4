"""EDAAN: the translation formula, its losses on known tensors, the quartet loss by hand, one optimisation step, and a
run on real crops that is killed in the translation phase, resumed across the attention cut-off and exported to a
model the edge embedder loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from trainer_runs import crash_after, epochs, export_parity, records, resume, tiny_config

from crossview.kernel import checkpoint
from crossview.kernel.config import ConfigError
from crossview.trainer.config import TrainConfig, load_train_config
from crossview.trainer.data.build import TrainData
from crossview.trainer.data.samples import Sample
from crossview.trainer.engine import _lr_factor, make_optimizer
from crossview.trainer.methods import METHODS
from crossview.trainer.methods.edaan import SHEET, quartet
from crossview.trainer.modeling.embedding_losses import batch_hard_triplet
from crossview.trainer.modeling.gan import ImagePool, blend, from_unit, lsgan, to_unit
from crossview.trainer.modeling.losses import Batch

REPO = Path(__file__).resolve().parents[1]
# Generators, discriminators and masks a few channels wide: the tests exercise the wiring, not the translation.
TINY = {"gen_channels": 4, "gen_blocks": 1, "disc_channels": 4, "disc_layers": 2, "attn_channels": 4, "pool": 4,
        "sheet": 4}


def _cfg(**edaan) -> TrainConfig:
    return TrainConfig.model_validate({
        "method": "edaan", "name": "t", "source": {"kind": "folders", "root": "s"},
        "target": {"kind": "images", "root": "t"}, "input": {"height": 64, "width": 32},
        "model": {"backbone": "mobilenet_v2", "pretrained": "none", "embedding_dim": 16}, "edaan": TINY | edaan,
    })


class Keep(torch.nn.Module):
    """An attention network that keeps everything: A(x) = 1."""

    def forward(self, x):
        return torch.ones_like(x[:, :1])


def test_a_mask_of_ones_returns_the_input_unchanged_and_zeros_the_translation():
    x, y = torch.randn(2, 3, 8, 4), torch.randn(2, 3, 8, 4)
    assert torch.equal(blend(x, y, torch.ones(2, 1, 8, 4)), x)
    assert torch.equal(blend(x, y, torch.zeros(2, 1, 8, 4)), y)
    half = blend(x, y, torch.full((2, 1, 8, 4), 0.5))
    assert torch.allclose(half, (x + y) / 2)
    net = METHODS["edaan"](_cfg()).build(3)
    net.attn_s = Keep()
    image = torch.rand(2, 3, 64, 32) * 2 - 1
    translated, keep, raw = net.translate(image, to_target=True)
    assert torch.equal(translated, image) and torch.equal(keep, torch.ones(2, 1, 64, 32))  # Eq. 1 with A = 1
    assert torch.equal(raw, net.gen_s(image)) and not torch.equal(raw, image)  # the generator did translate
    plain = METHODS["edaan"](_cfg(attention=False)).build(3)
    translated, keep, _ = plain.translate(image, to_target=True)
    assert keep is None and torch.equal(translated, plain.gen_s(image))  # no attention: CycleGAN's G_S(E_S(x))


def test_pixel_spaces_round_trip_and_lsgan_on_known_scores():
    x = torch.randn(2, 3, 4, 4)
    assert torch.allclose(from_unit(to_unit(x)), x, atol=1e-6)
    white = torch.ones(1, 3, 1, 1)  # RGB 1.0, normalised
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(to_unit(((white.view(3) - mean) / std).view(1, 3, 1, 1)), white, atol=1e-6)
    scores = torch.tensor([[1.0, 0.5], [0.0, 2.0]])
    assert lsgan(scores, True).item() == pytest.approx((0 + 0.25 + 1 + 1) / 4)  # mean (D - 1)²
    assert lsgan(scores, False).item() == pytest.approx((1 + 0.25 + 0 + 4) / 4)  # mean D²


def test_the_image_pool_fills_then_mixes_history_into_what_the_discriminator_sees():
    pool = ImagePool(3)
    first = torch.arange(3.0).view(3, 1, 1, 1)
    assert torch.equal(pool.query(first), first)  # filling: shown as they are
    torch.manual_seed(0)
    shown = pool.query(torch.full((40, 1, 1, 1), 9.0))
    values = set(shown.flatten().tolist())
    assert 9.0 in values and values & {0.0, 1.0, 2.0}  # new images and stored ones, swapped in
    assert len(pool.images) == 3
    restored = ImagePool(3)
    restored.load_state_dict(pool.state_dict(), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(restored.images, pool.images))
    assert torch.equal(ImagePool(0).query(first), first)


def _quartet_batch() -> tuple[torch.Tensor, torch.Tensor]:
    # Three identities on a line: 0 at {0, 1}, 1 at {3, 4}, 2 at {4.5, 5}.
    return torch.tensor([[0.0], [1.0], [3.0], [4.0], [4.5], [5.0]]), torch.tensor([0, 0, 1, 1, 2, 2])


def test_quartet_loss_against_a_hand_computed_case():
    f, labels = _quartet_batch()
    # τ1 = τ2 = 1. Per anchor: p the farthest positive, n1 the nearest negative, n2 the nearest to n1 of a third id.
    # anchor  d(a,p)  n1 (d(a,n1))  n2 (d(n1,n2))  hinge 1: d(a,p) - d(a,n1) + 1  hinge 2: d(a,p) - d(n1,n2) + 1
    #   0       1       3 (3)         4.5 (1.5)      -1 → 0                         0.5
    #   1       1       3 (2)         4.5 (1.5)       0                             0.5
    #   3       1       4.5 (1.5)     1 (3.5)         0.5                           -1.5 → 0
    #   4       1       4.5 (0.5)     1 (3.5)         1.5                           -1.5 → 0
    #   4.5     0.5     4 (0.5)       1 (3)           1                             -1.5 → 0
    #   5       0.5     4 (1)         1 (3)           0.5                           -1.5 → 0
    first, second = 3.5 / 6, 1.0 / 6
    assert quartet(f, labels, 1.0, 1.0).item() == pytest.approx(first + second, rel=1e-5)
    assert batch_hard_triplet(f, labels, 1.0).item() == pytest.approx(first, rel=1e-5)  # hinge 1 is the triplet
    assert quartet(f, labels, 1.0, 0.4).item() == pytest.approx(first, rel=1e-5)  # τ2 0.4 < 1.5 - 1: hinge 2 silent
    two_ids = labels.clamp_max(1)  # no third identity: only the triplet hinge remains
    assert quartet(f, two_ids, 1.0, 1.0).item() == pytest.approx(batch_hard_triplet(f, two_ids, 1.0).item())


def _step(method, net, attention_on: bool):
    """One `train_step` on a random source + target batch; returns (terms, the names of the modules that changed)."""
    method.learn_attention = attention_on
    optimizer = make_optimizer(net, method.cfg.adapt, method.cfg.optim)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batch = Batch(torch.randn(8, 3, 64, 32), 4, torch.tensor([0, 0, 1, 1]))
    net.train()
    loss, terms = method.train_step(net, batch, optimizer, torch.amp.GradScaler("cuda", enabled=False), False,
                                    where="test")
    changed = {k.split(".")[0] for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert loss == pytest.approx(sum(v for k, v in terms.items() if not k.startswith("mask_")), rel=1e-4)
    return terms, changed


def test_one_step_trains_every_network_and_freezes_the_masks_after_the_cut_off():
    torch.manual_seed(0)
    method = METHODS["edaan"](_cfg())
    net = method.build(2)
    terms, changed = _step(method, net, attention_on=True)
    assert set(terms) == {"gan", "cycle", "attn", "id", "quartet", "mask_s", "mask_t", "disc"}
    assert 0 < terms["mask_s"] < 1 and all(v >= 0 for v in terms.values())
    assert changed == {"trunk", "embedding", "classifier", "gen_s", "gen_t", "attn_s", "attn_t", "disc_s", "disc_t"}
    assert len(method.pools[0].images) == 4  # D_T saw the 4 translated source images
    terms, changed = _step(method, net, attention_on=False)
    assert "attn" not in terms and not changed & {"attn_s", "attn_t"}  # A_S, A_T frozen, Eq. 5 dropped
    assert {"gen_s", "gen_t", "disc_s", "disc_t", "trunk"} <= changed
    triplet = METHODS["edaan"](_cfg(loss="triplet", attention=False))
    terms, _ = _step(triplet, triplet.build(2), attention_on=True)
    assert set(terms) == {"gan", "cycle", "id", "triplet", "disc"}  # no masks, no Eq. 5


def test_the_discriminator_sees_whole_images_then_only_what_the_mask_translates():
    method = METHODS["edaan"](_cfg())
    image, keep = torch.ones(1, 3, 2, 2), torch.tensor([[[[1.0, 0.0], [0.25, 0.5]]]])
    assert torch.equal(method._seen(image, keep), image)
    method.masked = True
    assert torch.equal(method._seen(image, keep), (1 - keep).expand(1, 3, 2, 2))


def test_linear_decay_is_cyclegans_and_bad_settings_are_refused():
    sched = load_train_config(REPO / "configs" / "train" / "edaan.yaml").adapt
    assert [_lr_factor(sched, e) for e in (0, 99)] == [1.0, 1.0]
    assert _lr_factor(sched, 100) == pytest.approx(1 - 1 / 101) and _lr_factor(sched, 199) == pytest.approx(1 / 101)
    with pytest.raises(ValueError, match="decay_epochs"):
        TrainConfig.model_validate(_cfg().model_dump() | {"adapt": {"epochs": 4, "lr": 1e-3, "decay_epochs": 5}})
    data = TrainData((Sample(Path("s.jpg"), 0, 0),), (Sample(Path("t.jpg"), -1, 0),), None, None, 1)
    METHODS["edaan"](_cfg()).check(data)
    odd = TrainConfig.model_validate(_cfg().model_dump() | {"input": {"height": 66, "width": 32}})
    with pytest.raises(ValueError, match="multiples of 4"):
        METHODS["edaan"](odd).check(data)
    with pytest.raises(ValueError, match="edaan.disc_layers 5"):
        METHODS["edaan"](_cfg(disc_layers=5)).check(data)


def test_shipped_configs_hold_the_papers_schedule_and_a_cpu_sized_one(tmp_path):
    gpu = load_train_config(REPO / "configs" / "train" / "edaan.yaml")
    e = gpu.edaan
    assert gpu.method == "edaan" and gpu.model.backbone == "resnet50" and (e.loss, e.attention) == ("quartet", True)
    assert (e.gen_channels, e.gen_blocks, e.disc_layers, e.cycle, e.attn, e.id, e.metric) == (64, 9, 3, 10, 10, 1, 1)
    assert (e.attention_epochs, e.whole_image_epochs, e.pool) == (30, 30, 50)
    assert (gpu.optim.kind, gpu.optim.momentum, gpu.adapt.lr, gpu.adapt.epochs, gpu.adapt.decay_epochs) == \
        ("adam", 0.5, 2e-4, 200, 100)
    assert gpu.sampler.p * gpu.sampler.k == 16
    cpu = load_train_config(REPO / "bench" / "train" / "tud-edaan.yaml")
    assert cpu.method == "edaan" and cpu.model.backbone == "mobilenet_v2" and cpu.edaan.gen_blocks < e.gen_blocks
    assert cpu.source.root.name == "TUD-Campus" and cpu.target.root.name == "TUD-Stadtmitte"
    bad = tmp_path / "train.yaml"
    bad.write_text("method: edaan\nname: t\nsource: {kind: folders, root: s}\ntarget: {kind: images, root: t}\n"
                   "edaan: {loss: hinge}\n")
    with pytest.raises(ConfigError, match="edaan.loss"):
        load_train_config(bad)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """One EDAAN run on real crops: a source-only epoch, then 2 translation epochs with the attention cut-off after the
    first; killed after that first one and resumed. (tmp, the masks' weights at the kill, the exported ONNX)."""
    tmp = tmp_path_factory.mktemp("edaan")
    path = tiny_config(tmp, "edaan", model={"embedding_dim": 32}, sampler={"p": 3, "k": 4},
                       edaan=TINY | {"attention_epochs": 1, "whole_image_epochs": 1},
                       pretrain={"epochs": 1}, adapt={"epochs": 2, "decay_epochs": 1})
    crash_after(path, "adapt", 1)
    assert epochs(tmp / "run") == [("pretrain", 0, 1), ("adapt", 1, 1)]
    assert (tmp / "run" / SHEET).is_file()
    killed = checkpoint.load(tmp / "run" / "last.pt")
    assert len(killed.method["pools"][0]["images"]) == 4  # the pool is in the checkpoint
    masks = {k: v for k, v in killed.model.items() if k.startswith(("attn_s.", "attn_t."))}
    return tmp, masks, resume(path)


def test_resume_in_the_translation_phase_crosses_the_attention_cut_off(resumed):
    tmp, masks, _ = resumed
    run = tmp / "run"
    assert epochs(run) == [("pretrain", 0, 1), ("adapt", 1, 1), ("adapt", 1, 2)]  # nothing twice, nothing skipped
    recs = records(run)
    pre, first, second = (r for r in recs if r["event"] == "epoch")
    assert set(pre) >= {"id", "quartet"} and "gan" not in pre  # the source-only epoch: re-ID alone
    assert {"gan", "cycle", "attn", "disc", "mask_s", "mask_t"} <= set(first) and "attn" not in second
    assert 0 < second["mask_s"] < 1  # the mask mean, logged every epoch
    stops = [r for r in recs if r["event"] in ("attention_stopped", "discriminator_masked")]
    assert [(r["event"], r["epoch"]) for r in stops] == [("attention_stopped", 1), ("discriminator_masked", 1)]
    final = checkpoint.load(run / "last.pt").model
    assert all(torch.equal(final[k], v) for k, v in masks.items())  # the masks trained no more after the cut-off
    assert [r["label"] for r in recs if r["event"] == "eval"] == ["direct transfer", "iteration 1"]


def test_the_sheet_shows_source_mask_and_translation_rows(resumed):
    tmp, _, _ = resumed
    sheet = Image.open(tmp / "run" / SHEET)
    # 4 crops of 64x32 (+1 px frame each side), enlarged x2; three rows: source, mask, translation.
    assert sheet.size == (4 * 34 * 2, 3 * 66 * 2) and sheet.mode == "RGB"


def test_export_is_the_reid_path_alone_and_the_edge_embedder_matches_torch(resumed):
    tmp, _, onnx_path = resumed
    diff, dim = export_parity(onnx_path, tmp / "run" / "last.pt", tmp / "cache" / "TUD-Campus")
    assert dim == 32 and diff <= 1e-4
    import onnx

    names = {init.name for init in onnx.load(onnx_path).graph.initializer}
    assert not any(n.startswith(("gen_", "attn_", "disc_", "classifier")) for n in names)
