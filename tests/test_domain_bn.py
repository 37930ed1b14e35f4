"""Batch statistics per domain (`adapt.domain_bn`, `trainer.modeling.domain_bn`) and the mean teacher (`adapt.ema`):
on known tensors, and the switch's config check. The real TCAP run with both on (resume, export parity) is in
`test_trainer_tcap`."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from trainer_runs import tiny_config

from crossview.trainer.config import load_train_config
from crossview.trainer.engine import Trainer, ema_update
from crossview.trainer.modeling.domain_bn import domains_split, reestimate, use_domain_bn


def _two_domains() -> torch.Tensor:
    """4 source rows around +5, 6 target rows around -3, 3 channels of 4x4."""
    g = torch.Generator().manual_seed(0)
    return torch.cat([5 + torch.randn(4, 3, 4, 4, generator=g), -3 + 2 * torch.randn(6, 3, 4, 4, generator=g)])


def test_a_split_batch_is_normalised_per_domain_and_only_the_target_moves_the_running_statistics():
    x = _two_domains()
    plain, split = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    assert use_domain_bn(nn.Sequential(split)) == 1 and isinstance(split, nn.BatchNorm2d)
    with domains_split(split, 4):
        y = split(x)
    for rows in (y[:4], y[4:]):  # each domain centred and scaled by its own statistics
        assert torch.allclose(rows.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
        assert torch.allclose(rows.var((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)
    target = x[4:]
    assert torch.allclose(split.running_mean, 0.1 * target.mean((0, 2, 3)), atol=1e-5)  # momentum 0.1 from 0
    assert torch.allclose(split.running_var, 0.9 + 0.1 * target.var((0, 2, 3), unbiased=True), atol=1e-4)

    assert split.split is None  # the context is over: a whole batch is normalised as one, as BatchNorm does
    ref = copy.deepcopy(split)
    ref.__class__ = nn.BatchNorm2d
    assert torch.allclose(split(x), ref(x)) and torch.allclose(split.running_mean, ref.running_mean)
    plain(x)
    assert not torch.allclose(plain.running_mean, 0.1 * target.mean((0, 2, 3)), atol=0.1)  # the mixture, for contrast
    split.eval()
    ref.eval()
    assert torch.equal(split(x), ref(x)) and set(split.state_dict()) == set(plain.state_dict())


def test_the_source_rows_learn_the_affine_weights_too():
    bn = nn.BatchNorm1d(5)
    use_domain_bn(bn)
    x = torch.randn(8, 5)
    with domains_split(bn, 3):
        (bn(x)[:3] ** 3).sum().backward()
    assert bn.weight.grad.abs().sum() > 0 and bn.bias.grad.abs().sum() > 0


def test_adabn_sets_the_exact_statistics_of_the_target_on_the_eval_path_only():
    on_path, off_path = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.decoder_bn, self.drop = on_path, off_path, nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(self.bn(x)) if self.training else self.bn(x)  # decoder_bn: training only

    net = Net().train()
    net.bn.momentum = 0.3
    before = off_path.running_mean.clone() + 1
    off_path.running_mean.copy_(before)
    batches = list(_two_domains()[4:].split(2))  # the target, 3 batches of 2
    assert reestimate(net, batches) == 6
    target = torch.cat(batches)
    assert torch.allclose(on_path.running_mean, target.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(on_path.running_var, target.var((0, 2, 3)), rtol=0.2)  # per-batch unbiased, averaged
    assert torch.equal(off_path.running_mean, before)  # never on the eval path: left alone
    assert net.training and on_path.training and net.drop.training and on_path.momentum == 0.3


def test_a_method_that_optimises_its_own_batches_refuses_the_switch(tmp_path):
    path = tiny_config(tmp_path, "edaan", adapt={"domain_bn": True})
    with pytest.raises(ValueError, match=r"adapt.domain_bn: method 'edaan' optimises its batches itself"):
        Trainer(load_train_config(path))


def test_the_mean_teacher_moves_by_one_minus_its_momentum_and_takes_the_students_statistics():
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = copy.deepcopy(student)
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()(torch.randn(6, 3))  # moves the student's running statistics
    ema_update(teacher, student, 0.9)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s)
    assert torch.equal(teacher[1].running_mean, student[1].running_mean)
    assert int(teacher[1].num_batches_tracked) == 1
