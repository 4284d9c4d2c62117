import pytest
import torch

from attnfd_pipeline.data.loaders import AugmentedDataset, EpochSampler, FreshSeeds, ValDataset, make_loader
from attnfd_pipeline.data.source import ImageSource
from attnfd_pipeline.engine.checkpoint import load_checkpoint
from attnfd_pipeline.engine.train import fit, read_log
from attnfd_pipeline.models import build_model
from attnfd_pipeline.teacher import SegTask
from attnfd_pipeline.utils import seed_everything
from fakes import interrupted_after
from hand_metrics import hand_metrics


def _setup(cfg):
    src = ImageSource.from_config(cfg)
    val = ImageSource.from_config(cfg, cfg.data.val_split)
    ds = AugmentedDataset(src, cfg.augment, FreshSeeds())
    sampler = EpochSampler(len(ds), seed=0)
    loader = make_loader(ds, batch_size=4, workers=0, sampler=sampler, drop_last=True)

    def loader_for(epoch):
        sampler.set_epoch(epoch)
        return loader

    return src, loader_for, make_loader(ValDataset(val, cfg.augment.crop_size), batch_size=4, workers=0)


def _train(cfg, run_dir, **kw):
    seed_everything(0)
    model = build_model("deeplabv3plus_mobilenetv2", 11)
    src, loader_for, val = _setup(cfg)
    res = fit(SegTask(model), train_loader_for=loader_for, val_loader=val, cfg=cfg.teacher.train, run_dir=run_dir,
              num_classes=11, device=torch.device("cpu"), config_dict=cfg.to_dict(), progress=False, **kw)
    return model, res


@pytest.mark.slow
def test_loss_goes_down(tiny_data, tmp_path):
    from conftest import make_cfg

    cfg = make_cfg(tiny_data, tmp_path, "teacher.train.epochs=6", "teacher.train.eval_every=6")
    model, res = _train(cfg, tmp_path / "run")
    log = read_log(tmp_path / "run" / "metrics.parquet")
    losses = [r["train_loss"] for r in log]
    assert len(log) == 6 and losses[-1] < 0.8 * losses[0]
    # the per-iteration poly schedule spans the whole run (6 epochs × 2 steps), ending at 0
    t = cfg.teacher.train
    assert t.schedule == "poly" and [r["step"] for r in log] == [2, 4, 6, 8, 10, 12]
    assert [r["lr"] for r in log] == pytest.approx([t.lr * (1 - r["step"] / 12) ** t.poly_power for r in log])
    # one evaluation (epoch 6): best = the logged one = the final network scored class by class by hand
    assert [r["miou"] is not None for r in log] == [False] * 5 + [True]
    hand = hand_metrics(model, _setup(cfg)[2], 11)
    assert res.best_miou == log[-1]["miou"] == pytest.approx(hand["miou"], abs=1e-12)
    assert log[-1]["pixel_acc"] == pytest.approx(hand["pixel_acc"], abs=1e-12)
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "last.pt").is_file()
    # best.pt: weights and metrics only (evaluation needs no optimizer state); last.pt: everything resume needs
    best, last = (load_checkpoint(tmp_path / "run" / n) for n in ("best.pt", "last.pt"))
    assert best["optimizer"] is None and best["scheduler"] is None and "miou" in best["extra"]["metrics"]
    assert last["optimizer"]["state"] and last["scheduler"] is not None
    assert (tmp_path / "run" / "best.pt").stat().st_size < 0.75 * (tmp_path / "run" / "last.pt").stat().st_size


@pytest.mark.slow
def test_resume_continues_exactly(tiny_data, tmp_path):
    from conftest import make_cfg

    cfg = make_cfg(tiny_data, tmp_path, "teacher.train.epochs=2")
    full, _ = _train(cfg, tmp_path / "full")
    with interrupted_after(1) as cut:  # Ctrl-C as epoch 2 starts
        _train(cfg, tmp_path / "cut")
    assert cut["interrupted"] and len(read_log(tmp_path / "cut" / "metrics.parquet")) == 1
    resumed, res = _train(cfg, tmp_path / "cut", resume=True)
    assert res.epochs_done == 2
    # the run's time counts both calls' epochs (and evaluations), not just the resumed call's
    cut_rows = read_log(tmp_path / "cut" / "metrics.parquet")
    assert res.train_seconds == pytest.approx(sum(r["epoch_seconds"] + r["eval_seconds"] for r in cut_rows))
    assert len(cut_rows) == 2 and all(r["epoch_seconds"] > 0 for r in cut_rows)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    full_log, cut_log = read_log(tmp_path / "full" / "metrics.parquet"), read_log(tmp_path / "cut" / "metrics.parquet")
    assert [r["train_loss"] for r in full_log] == [r["train_loss"] for r in cut_log]
    assert full_log[-1]["miou"] == cut_log[-1]["miou"]


@pytest.mark.slow
def test_resume_refuses_another_recipe(tiny_data, tmp_path):
    import dataclasses

    import pytest

    from conftest import make_cfg

    cfg = make_cfg(tiny_data, tmp_path, "teacher.train.epochs=2")
    with interrupted_after(1) as cut:
        _train(cfg, tmp_path / "cut")
    assert cut["interrupted"]
    before = (tmp_path / "cut" / "last.pt").read_bytes()
    changed = dataclasses.replace(cfg, teacher=dataclasses.replace(
        cfg.teacher, train=dataclasses.replace(cfg.teacher.train, lr=cfg.teacher.train.lr * 2)))
    with pytest.raises(ValueError, match=r"last\.pt: cannot resume.*train\.lr"):
        _train(changed, tmp_path / "cut", resume=True)
    assert (tmp_path / "cut" / "last.pt").read_bytes() == before  # nothing overwritten
    # where it runs and how often it evaluates may change
    moved = dataclasses.replace(cfg, teacher=dataclasses.replace(
        cfg.teacher, train=dataclasses.replace(cfg.teacher.train, eval_every=2, device="cpu")))
    _, res = _train(moved, tmp_path / "cut", resume=True)
    assert res.epochs_done == 2


def test_epoch_sampler_is_pure_and_partitions():
    s = EpochSampler(10, seed=3)
    s.set_epoch(2)
    a = list(s)
    s.set_epoch(2)
    assert list(s) == a and sorted(i for _, i in a) == list(range(10)) and all(e == 2 for e, _ in a)
    s.set_epoch(3)
    assert list(s) != a
    ranks = [EpochSampler(10, seed=3, rank=r, world=3) for r in range(3)]
    for r in ranks:
        r.set_epoch(2)
    union = sorted(i for r in ranks for _, i in r)
    assert len(union) == 12 and set(union) == set(range(10))
