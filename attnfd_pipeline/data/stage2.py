"""The Stage 2 training dataset: the student's crops, with the teacher targets cached for them.

The dataset replays each crop from the parameters the cache stored and checks its content hashes itself
(``replay_cached``); the cache reader only reads targets and manifest records — the image never goes data
→ cache → data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnfd_pipeline import augment
from attnfd_pipeline.cache.encoding import batch_item
from attnfd_pipeline.cache.errors import CacheError
from attnfd_pipeline.data.loaders import AugmentedDataset, CachedSeeds, FreshSeeds
from attnfd_pipeline.data.replay import replay

if TYPE_CHECKING:
    from attnfd_pipeline.cache.reader import CacheReader


def replay_cached(reader: CacheReader, source, index: int, aug_seed: int, *, check: bool = True):
    """The augmented uint8 (image, label) the teacher saw for cached sample (index, aug_seed), rebuilt from the
    parameters its manifest row stores; with ``check``, its content hashes must equal the stored ones
    (CacheError otherwise: dataset files or augmentation code changed since the cache was built)."""
    _, img, lab = replay(source, index, aug_seed, params=reader.params(index, aug_seed),
                          impl=reader.augment_impl)
    if check:
        ih, lh = reader.hashes(index, aug_seed)
        for what, got, want in (("image", augment.content_hash(img), ih), ("label", augment.content_hash(lab), lh)):
            if got != want:
                raise CacheError(f"{reader.path}: replayed {what} of image {reader.image_id(index, aug_seed)!r} "
                                 f"(index {index}), aug seed {aug_seed} differs from the cached one (dataset "
                                 f"files or augmentation code changed since the cache was built)")
    return img, lab


class StudentDataset(AugmentedDataset):
    """Training crops at the cached seeds (or fresh ones, ``FreshSeeds``, when the targets are computed
    online on fresh draws); with a ``reader``, the crop is the replay of the stored parameters
    (hash-checked against the manifest) and the sample carries its cached targets ``names`` in their stored
    form (``encoding.batch_item``: float16, or uint8 codes + float32 scale/offset), decoded on the student's
    device by the distillation head — never float32 through worker shared memory and the host-to-device copy."""

    def __init__(self, source, cfg, seeds: CachedSeeds | FreshSeeds, reader: CacheReader | None = None, names=()):
        super().__init__(source, cfg, seeds)
        self.reader, self.names = reader, tuple(names)

    def __getitem__(self, key):
        epoch, index = key
        if self.reader is None:
            return super().__getitem__(key)
        k = self.seed_fn(epoch, index)
        image, label = replay_cached(self.reader, self.source, index, k, check=True)
        return {"image": image, "label": label, "index": index, "aug_seed": k,  # uint8, as AugmentedDataset
                "targets": self.stored_targets(index, k)}

    def stored_targets(self, index: int, aug_seed: int) -> dict:
        """Sample ``(index, aug_seed)``'s cached targets (checksum-verified) in their stored form."""
        enc = self.reader.encoding
        return {n: batch_item(enc, ps) for n, ps in self.reader.read_stored(index, aug_seed, self.names).items()}
