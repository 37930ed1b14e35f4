"""Adaptation methods behind the one interface: the registry, their config defaults, and one round of each."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from crossview.kernel.config import ConfigError
from crossview.trainer.config import TrainConfig, load_train_config
from crossview.trainer.data.samples import Sample
from crossview.trainer.methods import METHODS
from crossview.trainer.methods.base import Method
from crossview.trainer.modeling.losses import Batch

# The loss terms each method's paper setting trains on (DAAL Eq. 7 drops L_DS and L_orth).
TERMS = {"daam": {"reid_s", "reid_t", "ds", "dsp", "orth"}, "daal": {"reid_s", "reid_t", "dsp"}}
GROUPS, PER_GROUP = 4, 5


class FakeRun:
    """The engine's side of `target_step` on 20 target images in 4 tight groups of features."""

    def __init__(self, dim: int):
        target = [Sample(Path(f"t{i}.jpg"), -1, 0) for i in range(GROUPS * PER_GROUP)]
        self.data = SimpleNamespace(source=[Sample(Path(f"s{i}.jpg"), i % 5, 0) for i in range(10)], target=target)
        noise = 0.01 * np.random.default_rng(0).standard_normal((len(target), dim))
        f = np.repeat(np.eye(GROUPS, dim), PER_GROUP, axis=0) + noise
        self.features = (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)
        self.records: list[dict] = []

    def extract(self, samples):
        assert list(samples) == self.data.target
        return self.features

    def share(self, compute):
        return compute()

    def log(self, event, **fields):
        self.records.append({"event": event, **fields})


def _cfg(**over) -> TrainConfig:
    raw = {"name": "t", "source": {"kind": "folders", "root": "s"}, "target": {"kind": "images", "root": "t"},
           "model": {"backbone": "mobilenet_v2", "pretrained": "none"},
           "clustering": {"k": GROUPS, "k1": 4, "k2": 2, "p": 0.2, "min_samples": 3}, **over}
    return TrainConfig.model_validate(raw)


def test_registry_keys_are_the_methods_names():
    assert list(METHODS) == ["daam", "daal", "arn", "adfl", "tcap", "edaan"]
    assert all(issubclass(cls, Method) and cls.name == key for key, cls in METHODS.items())


def test_an_unknown_method_is_a_config_error_naming_the_key(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"method": "nope", "name": "t", "source": {"kind": "folders", "root": "s"},
                                    "target": {"kind": "images", "root": "t"}}))
    with pytest.raises(ConfigError, match=r"train.yaml: invalid configuration\n  method: .*unknown method 'nope'; "
                                          r"choose one of daam, daal, arn, adfl"):
        load_train_config(path)


def test_a_method_brings_its_papers_settings_and_the_file_still_wins():
    assert _cfg().method == "daam" and _cfg().model.attention == "daam" and _cfg().loss.target == "weighted"
    daal = _cfg(method="daal")
    assert (daal.model.attention, daal.model.head, daal.model.domain_loss) == ("daal", "gap", "none")
    assert (daal.loss.ds, daal.loss.orth, daal.loss.target, daal.clustering.method) == (0.0, 0.0, "soft", "dbscan")
    ablation = _cfg(method="daal", model={"backbone": "mobilenet_v2", "pretrained": "none", "attention": "none"})
    assert (ablation.model.attention, ablation.model.head) == ("none", "gap")  # the switch set, the rest DAAL's


@pytest.mark.parametrize("name", list(TERMS))
def test_one_round_through_the_interface(name):
    """Build, step on the target, draw, train one batch, save and restore, then stop once labels are stable.

    The pseudo-label methods; ARN and ADFL, which have no step on the target, have their own tests."""
    cfg = _cfg(method=name)
    method = METHODS[name](cfg)
    net = method.build(5)
    run = FakeRun(net.dim)
    assert method.target_step(run, net) is False  # the first round has nothing to agree with
    (first,) = run.records
    assert first["event"] == "cluster" and first["clusters"] == GROUPS and "nmi" not in first

    draw = method.adapt_samples(run.data)
    assert draw.source == run.data.source and len(draw.target) == len(draw.target_weights) == len(run.data.target)
    picked = [i for i, s in enumerate(draw.target) if s.pid >= 0][:4]
    assert len(picked) == 4
    x = torch.randn(8, 3, 64, 32)
    batch = Batch(x, 4, torch.tensor([0, 1, 2, 3]), torch.tensor([draw.target[i].pid for i in picked]),
                  draw.target_weights[picked])
    net.train()
    loss, terms = method.losses(net(x), batch)
    assert set(terms) == TERMS[name] and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())  # DDP runs without the unused-parameter search

    restored = METHODS[name](cfg)
    copy = restored.build(5, pretrained="none")
    restored.load_state_dict(method.state_dict(), copy)
    copy.load_state_dict(net.state_dict())
    net.eval(), copy.eval()
    with torch.no_grad():
        assert net(x).shape == (8, net.dim) and torch.equal(copy(x), net(x))
        assert torch.equal(net.embedder()(x), net(x))

    assert method.target_step(run, net) is True  # the same features cluster the same: NMI 1 > adapt.nmi_stop
    assert run.records[1]["nmi"] == 1.0
