"""A cache records the augmentation implementation it was built with and replays with it: a cache of
implementation 1 (every cache written before implementation 2 existed records none) keeps replaying
exactly, one of implementation 2 replays with 2, and the fingerprint of an ``impl = 1`` config is the one it
had before the setting existed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fakes import FakeSource, FakeTeacher, fake_cfg

from attnfd_pipeline import augment
from attnfd_pipeline.cache import CacheError, CacheReader, build_cache, cache_fingerprint
from attnfd_pipeline.cache.fingerprint import cache_inputs
from attnfd_pipeline.data.loaders import CachedSeeds
from attnfd_pipeline.data.stage2 import StudentDataset, replay_cached


def _with_impl(cfg, impl):
    return dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, impl=impl))


def test_impl_1_fingerprint_is_the_one_without_the_setting(tmp_path):
    cfg, teacher, source = fake_cfg(tmp_path), FakeTeacher(), FakeSource(3)
    inputs = cache_inputs(cfg, teacher, source)
    assert "impl" not in inputs["augment"]  # as written before the setting existed: old caches are found
    two = cache_inputs(_with_impl(cfg, 2), teacher, source)
    assert two["augment"]["impl"] == 2
    assert cache_fingerprint(_with_impl(cfg, 2), teacher, source) != cache_fingerprint(cfg, teacher, source)


@pytest.mark.parametrize("impl", [1, 2])
def test_cache_replays_with_its_recorded_implementation(tmp_path, impl):
    cfg = _with_impl(fake_cfg(tmp_path), impl)
    teacher, source = FakeTeacher(), FakeSource(3)
    r = build_cache(cfg, teacher, source, progress=False)
    reader = CacheReader(r.path)
    assert reader.augment_impl == impl
    for i in range(3):
        for k in range(cfg.cache.K):
            img, lab = replay_cached(reader, source, i, k, check=True)  # hashes of the build's bytes: equal
            image, label = source.load(i)
            want = augment.apply(reader.params(i, k), image, label, impl=impl)
            assert torch.equal(img, want[0]) and torch.equal(lab, want[1])
    # the Stage 2 dataset hands the replayed uint8 crop over (normalised later, on the device)
    item = StudentDataset(source, cfg.augment, CachedSeeds(0, cfg.cache.K), reader, ("D",))[(0, 0)]
    assert item["image"].dtype == torch.uint8 and torch.equal(item["image"], replay_cached(reader, source, 0, 0)[0])


def test_replaying_with_the_other_implementation_is_caught(tmp_path):
    """Implementation 2's bytes differ from 1's on some crops: the stored hashes catch a mix-up."""
    cfg = fake_cfg(tmp_path)
    source = FakeSource(3)
    r = build_cache(cfg, FakeTeacher(), source, progress=False)
    reader = CacheReader(r.path)
    reader.info = dataclasses.replace(reader.info, inputs={**reader.info.inputs,
                                                          "augment": {**reader.info.augment, "impl": 2}})
    with pytest.raises(CacheError, match="differs from the cached one"):
        for i in range(3):
            for k in range(cfg.cache.K):
                replay_cached(reader, source, i, k, check=True)
