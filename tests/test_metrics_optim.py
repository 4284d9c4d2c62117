import math

import numpy as np
import pytest
import torch

from attnfd_pipeline.config import TrainConfig
from attnfd_pipeline.engine.metrics import confusion_matrix, metrics_from_confusion
from attnfd_pipeline.engine.optim import build_optimizer, build_scheduler, param_groups


def test_perfect_prediction_is_one():
    target = torch.randint(0, 4, (2, 8, 8))
    target[0, 0, 0] = 255
    m = metrics_from_confusion(confusion_matrix(target.clamp(max=3), target, 4))
    assert m["miou"] == 1.0 and m["pixel_acc"] == 1.0 and m["class_acc"] == 1.0 and m["fwiou"] == pytest.approx(1.0)


def test_metrics_by_hand():
    target = torch.tensor([0, 0, 1, 1, 2, 255])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    cm = confusion_matrix(pred, target, 4)
    assert cm.sum() == 5  # ignore pixel skipped
    m = metrics_from_confusion(cm)
    iou = [1 / 3, 2 / 3, 0.0]  # class 3 absent from both → excluded
    assert m["miou"] == pytest.approx(np.mean(iou))
    assert m["pixel_acc"] == pytest.approx(3 / 5)
    assert m["class_acc"] == pytest.approx(np.mean([0.5, 1.0, 0.0]))
    assert m["fwiou"] == pytest.approx(2 / 5 * 1 / 3 + 2 / 5 * 2 / 3 + 1 / 5 * 0)
    assert m["per_class_iou"][3] is None


def test_label_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 4)


def test_head_lr_is_ten_times_and_schedules_follow_formula():
    backbone, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    cfg = TrainConfig(lr=0.1, schedule="poly")
    opt = build_optimizer(param_groups(backbone.parameters(), head.parameters(), cfg), cfg)
    assert [g["lr"] for g in opt.param_groups] == [0.1, pytest.approx(1.0)]
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 5e-4
    sched = build_scheduler(opt, cfg, 10)
    # the formulas written out (docs/method.md): poly (1 - t/T)^0.9, cosine 1/2 (1 + cos(pi t/T)), to 0 at T
    for it in range(1, 11):
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - it / 10) ** 0.9, abs=1e-15)
    cfg = TrainConfig(lr=0.1, schedule="cosine")
    opt = build_optimizer(param_groups(backbone.parameters(), head.parameters(), cfg), cfg)
    sched = build_scheduler(opt, cfg, 10)
    for it in range(1, 11):
        opt.step()
        sched.step()
        assert opt.param_groups[1]["lr"] == pytest.approx(1.0 * 0.5 * (1 + math.cos(math.pi * it / 10)), abs=1e-12)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_param_in_both_groups_is_an_error():
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="both"):
        param_groups(lin.parameters(), lin.parameters(), TrainConfig())
