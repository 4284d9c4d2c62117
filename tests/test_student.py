import dataclasses
from pathlib import Path

import pytest
import torch

import attnfd_pipeline.teacher as teacher_mod
from attnfd_pipeline import augment
from attnfd_pipeline.engine.train import read_log, to_device
from attnfd_pipeline.cache import CacheError, CacheReader, find_cache
from attnfd_pipeline.config import TargetSource, load_config
from attnfd_pipeline.data.source import ImageSource
from attnfd_pipeline.data.stage2 import StudentDataset
from attnfd_pipeline.distill import StudentTask
from attnfd_pipeline.runs import run_student, student_dir
from attnfd_pipeline.data.loaders import CachedSeeds
from attnfd_pipeline.teacher import load_teacher, load_teacher_info
from fakes import share_teacher, with_overrides


@pytest.mark.slow
def test_cached_student_never_builds_the_teacher(tiny_pipeline, tmp_path, monkeypatch):
    cfg, _ = tiny_pipeline
    new = with_overrides(cfg, tmp_path, f'runs_root="{tmp_path / "runs"}"')
    share_teacher(cfg, new)

    def forbidden(*a, **k):
        raise AssertionError("Stage 2 from cache must not load or build the teacher")

    monkeypatch.setattr("attnfd_pipeline.runs.student.load_teacher", forbidden)
    monkeypatch.setattr(teacher_mod, "load_teacher", forbidden)
    monkeypatch.setattr(teacher_mod, "build_teacher_model", forbidden)
    result = run_student(new, progress=False)
    built = find_cache(new, load_teacher_info(new.teacher_dir / "teacher_bundle.pt"), ImageSource.from_config(new))
    assert result["mode"] == "cached" and Path(result["cache"]) == Path(built)  # the tiny pipeline's cache
    log = read_log(student_dir(new) / "metrics.parquet")
    assert result["best_miou"] == max(row["miou"] for row in log if row["miou"] is not None)
    assert load_config(student_dir(new) / "config.resolved.toml") == new  # the run records the config it ran


@pytest.mark.slow
def test_cached_targets_equal_online_targets(tiny_pipeline):
    """What Stage 2 reads from the cache is what the teacher computes online on the same crop, up to
    float16 storage (relative error ≤ 2^-11 per value, 1e-3 on the whole map)."""
    cfg, bundle = tiny_pipeline
    src = ImageSource.from_config(cfg)
    reader = CacheReader(find_cache(cfg, load_teacher_info(bundle), src))
    teacher = load_teacher(bundle)
    ds = StudentDataset(src, cfg.augment, CachedSeeds(0, cfg.cache.K), reader, ("B", "E", "D"))
    for epoch, index in [(0, 0), (1, 3), (2, 7)]:
        item = ds[(epoch, index)]
        assert item["image"].dtype == torch.uint8  # crops travel as uint8, normalised on the device
        online = teacher.targets(augment.normalize(item["image"])[None], ["B", "E", "D"])
        for p in "BED":
            cached = item["targets"][p].float()
            ref = online[p][0]
            assert cached.dtype == torch.float32 and cached.shape == ref.shape
            assert torch.allclose(cached, ref, rtol=2 ** -10, atol=1e-4)
            assert ((cached - ref).norm() / ref.norm()) < 1e-3


@pytest.mark.slow
def test_online_and_cached_losses_agree(tiny_pipeline):
    cfg, bundle = tiny_pipeline
    src = ImageSource.from_config(cfg)
    reader = CacheReader(find_cache(cfg, load_teacher_info(bundle), src))
    teacher = load_teacher(bundle)
    ds = StudentDataset(src, cfg.augment, CachedSeeds(0, cfg.cache.K), reader, ("B", "E", "D"))
    batch = to_device(torch.utils.data.default_collate([ds[(0, i)] for i in range(4)]), torch.device("cpu"))
    assert batch["image"].dtype == torch.float32
    from attnfd_pipeline.distill import Distiller
    from attnfd_pipeline.models import build_model

    torch.manual_seed(0)
    d = Distiller(build_model("deeplabv3plus_resnet18", 11), ("B", "E", "D"), {"B": 512, "E": 256, "D": 256}).eval()
    cached = StudentTask(d, alpha=2.0, norm="batch")
    online = StudentTask(d, alpha=2.0, norm="batch", teacher=teacher)
    feats = d(batch["image"])
    lc = cached.distill_loss(feats, cached._targets(batch))
    lo = online.distill_loss(feats, online._targets(batch))
    assert lc.item() == pytest.approx(lo.item(), rel=1e-3)


@pytest.mark.slow
def test_alpha_zero_is_exactly_the_plain_student(tiny_pipeline, tmp_path):
    cfg, _ = tiny_pipeline
    a0 = with_overrides(cfg, tmp_path, f'runs_root="{tmp_path / "a0"}"', "student.alpha=0")
    r = run_student(a0, progress=False)
    assert r["method"] == "none" and r["cache"] is None
    # the same run by hand: plain CE on the same crops, no distiller
    from attnfd_pipeline.data.loaders import EpochSampler, ValDataset, make_loader
    from attnfd_pipeline.engine.train import fit
    from attnfd_pipeline.models import build_model
    from attnfd_pipeline.teacher import SegTask
    from attnfd_pipeline.utils import seed_everything

    src = ImageSource.from_config(a0)
    seed_everything(0)
    model = build_model("deeplabv3plus_resnet18", 11)
    ds = StudentDataset(src, a0.augment, CachedSeeds(0, a0.cache.K))
    sampler = EpochSampler(len(ds), seed=0)
    loader = make_loader(ds, batch_size=4, workers=0, sampler=sampler, drop_last=True)
    val = make_loader(ValDataset(ImageSource.from_config(a0, "val"), a0.augment.crop_size), batch_size=4, workers=0)
    fit(SegTask(model), train_loader_for=lambda e: loader, val_loader=val, cfg=a0.student.train,
        run_dir=tmp_path / "plain", num_classes=11, device=torch.device("cpu"), config_dict={}, progress=False)
    saved = torch.load(student_dir(a0) / "last.pt", weights_only=True)["modules"]
    for k, v in model.state_dict().items():
        assert torch.equal(saved[f"student.{k}"], v), k


@pytest.mark.slow
def test_refuses_a_cache_that_does_not_match(tiny_pipeline, tmp_path):
    cfg, _ = tiny_pipeline
    new = with_overrides(cfg, tmp_path, f'runs_root="{tmp_path / "runs"}"', "cache.K=3")
    share_teacher(cfg, new)
    with pytest.raises(CacheError, match="K"):
        run_student(new, progress=False)


@pytest.mark.slow
def test_replay_hash_mismatch_names_the_image(tiny_pipeline, tmp_path):
    cfg, bundle = tiny_pipeline
    src = ImageSource.from_config(cfg)
    reader = CacheReader(find_cache(cfg, load_teacher_info(bundle), src))

    class Changed:  # the dataset changed after the cache was built
        def __init__(self, s):
            self.s = s

        def load(self, i):
            img, lab = self.s.load(i)
            return 255 - img, lab

        def __len__(self):
            return len(self.s)

    ds = StudentDataset(Changed(src), cfg.augment, CachedSeeds(0, cfg.cache.K), reader, ("D",))
    with pytest.raises(CacheError, match=r"replayed image of image 'train_00002'.*aug seed"):
        ds[(0, 2)]


@pytest.mark.slow
def test_online_mode_runs(tiny_pipeline, tmp_path):
    cfg, _ = tiny_pipeline
    new = with_overrides(cfg, tmp_path, f'runs_root="{tmp_path / "runs"}"', 'student.mode="online"',
                "student.connector_warmup_epochs=1", "student.train.epochs=2")
    share_teacher(cfg, new)
    r = run_student(new, progress=False)
    assert r["mode"] == "online" and r["epochs"] == 2
    assert dataclasses.replace(new.student, targets=TargetSource.CACHED) != new.student


@pytest.mark.slow
def test_resume_with_a_checkpoint_that_does_not_fit_writes_nothing(tiny_pipeline, tmp_path):
    """--resume checks that last.pt fits the student before the run folder is touched."""
    from attnfd_pipeline.engine.checkpoint import load_checkpoint, save_checkpoint

    cfg, _ = tiny_pipeline
    a0 = with_overrides(cfg, tmp_path, f'runs_root="{tmp_path / "runs"}"', "student.alpha=0")
    d = student_dir(a0)
    d.mkdir(parents=True)
    other = torch.nn.Conv2d(3, 4, 1)  # a checkpoint of some other model
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    save_checkpoint(d / "last.pt", modules=other, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 1.0), scaler=None, epoch=1, step=1, best=0.0, rng={}, config={})
    before = (d / "last.pt").read_bytes()
    with pytest.raises(ValueError, match=r"last\.pt: checkpoint does not fit this model"):
        run_student(a0, resume=True, progress=False)
    # no resolved config, log or result written (last.pt keeps the hash sidecar it was written with)
    assert sorted(p.name for p in d.iterdir()) == ["last.pt", "last.pt.sha256"]
    assert (d / "last.pt").read_bytes() == before
    assert load_checkpoint(d / "last.pt")["epoch"] == 1


def test_a_finished_run_ignores_the_sections_of_methods_it_does_not_train_with(tmp_path):
    """Tuning ``student.cirkd`` (or adding it to a config) must not orphan finished AttnFD runs, while a
    change of the recipe is still named."""
    import json

    from attnfd_pipeline.config import load_config, write_resolved
    from attnfd_pipeline.runs import finished_run_differences, student_dir

    def cfg(*sets):
        return load_config("configs/demo.toml", [f'runs_root="{tmp_path}"', "student.method=\"attnfd+kd\"", *sets])

    done = cfg()
    d = student_dir(done)
    d.mkdir(parents=True)
    write_resolved(done, d)
    (d / "result.json").write_text(json.dumps({"run": d.name, "final_miou": 0.5, "seed_order": "cycle"}))
    assert finished_run_differences(done) is None
    unused = cfg("student.cirkd.weight=0.5", "student.afdcd.tau=0.2")
    assert student_dir(unused) == d and finished_run_differences(unused) is None
    # the sections it trains with are in the run's name (a parameter hash), so a change trains another run
    assert student_dir(cfg("student.kd.weight=0.5")) != d
    assert "student.train.lr: " in finished_run_differences(cfg("student.train.lr=0.01"))


def test_a_run_from_before_seed_orders_counts_as_random_order(tmp_path):
    """result.json records ``seed_order``; a run without it (one that drew with replacement every epoch) must not
    stand in for a ``cycle`` run, and stands for ``seed_order = "random"``. Fresh crops never read the cached
    seeds, so the order does not make an online-fresh run differ."""
    import json

    from attnfd_pipeline.config import load_config, write_resolved
    from attnfd_pipeline.runs import finished_run_differences, student_dir, train_seeds

    def cfg(*sets):
        return load_config("configs/demo.toml", [f'runs_root="{tmp_path}"', *sets])

    for sets in ((), ('student.mode="online"', "student.online_fresh=true")):
        legacy = cfg(*sets, 'student.seed_order="random"')
        d = student_dir(legacy)
        d.mkdir(parents=True)
        write_resolved(legacy, d)
        (d / "result.json").write_text(json.dumps({"run": d.name, "final_miou": 0.5}))
        assert student_dir(cfg(*sets)) == d and finished_run_differences(legacy) is None
        expected = None if sets else "student.seed_order: 'random' → 'cycle'"
        assert finished_run_differences(cfg(*sets)) == expected
    assert train_seeds(cfg()).order == "cycle" and train_seeds(cfg('student.seed_order="random"')).order == "random"


@pytest.mark.slow
def test_resume_keeps_the_seed_order_of_the_first_epochs(tiny_pipeline, tmp_path):
    """A run interrupted under one seed order (a last.pt from before the order was recorded: ``random``) is
    not continued under another — its crops would switch schedule mid-run; the error says how to go on."""
    from attnfd_pipeline.engine.checkpoint import load_checkpoint

    cfg, _ = tiny_pipeline
    one = with_overrides(cfg, tmp_path, f'runs_root="{tmp_path / "runs"}"', "student.alpha=0")
    run_student(one, progress=False)
    d = student_dir(one)
    assert load_checkpoint(d / "last.pt")["extra"]["seed_order"] == "cycle"
    state = torch.load(d / "last.pt", weights_only=True)
    del state["extra"]["seed_order"]  # as written before the order was recorded (and without a .sha256 sidecar)
    state["format"] = "attnfd-checkpoint/1"
    torch.save(state, d / "last.pt")
    (d / "last.pt.sha256").unlink()
    (d / "result.json").unlink()  # "interrupted": resuming it continues from last.pt
    with pytest.raises(ValueError, match=r"last\.pt: this run's first epochs showed the cached seeds in order "
                                         r"'random'.*student\.seed_order = 'cycle'"):
        run_student(one, resume=True, progress=False)
    assert not (d / "result.json").exists()
    legacy = with_overrides(cfg, tmp_path, f'runs_root="{tmp_path / "runs"}"', "student.alpha=0", 'student.seed_order="random"')
    assert student_dir(legacy) == d and run_student(legacy, resume=True, progress=False)["epochs"] == 1
