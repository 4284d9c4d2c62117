"""Stage 1b teacher-feature cache: frozen-teacher targets per (image, aug seed) in sharded Zarr v3 stores
with a Parquet manifest per shard and a fingerprinted ``cache.json`` (layout in ``schema``).

Public API:
- ``build_cache(cfg, teacher, source, rank=0, world=1)`` → ``BuildResult`` (resumable, whole shards)
- ``plan_cache(cfg, source, teacher=…)`` → ``Plan`` (bytes, compression, free disk, time; refuses if too big)
- ``CacheReader(path)`` → ``read(i, k, names)``, ``read_stored``, ``params``, ``hashes``, ``manifest()``, ``info`` (a
  ``CacheInfo``)
- ``find_cache(cfg, teacher_info_or_sha, source)``, ``check_compatible(cfg, info)``, ``describe_cache(path)``
- ``verify_cache(path, source=…)`` → ``VerifyReport``
- ``CacheInfo`` (``cache.json``, typed: ``load_info(path)``, ``cache_info(cfg, teacher, source, specs)``)
- ``cache_fingerprint(cfg, teacher, source)``, ``CacheError``
"""

from attnfd_pipeline.cache.build import BuildResult, build_cache, cache_info
from attnfd_pipeline.cache.fingerprint import cache_dir_for, cache_fingerprint, cache_inputs
from attnfd_pipeline.cache.info import CacheInfo, TargetInfo, load_info
from attnfd_pipeline.cache.plan import Plan, plan_cache
from attnfd_pipeline.cache.reader import CacheReader, check_compatible, describe_cache, find_cache, list_caches
from attnfd_pipeline.cache.errors import CacheError
from attnfd_pipeline.cache.schema import cache_target_names, target_names
from attnfd_pipeline.cache.verify import BadSample, VerifyReport, verify_cache

__all__ = [
    "BadSample", "BuildResult", "CacheError", "CacheInfo", "CacheReader", "Plan", "TargetInfo", "VerifyReport",
    "build_cache", "cache_dir_for", "cache_fingerprint", "cache_info", "cache_inputs", "cache_target_names",
    "check_compatible", "describe_cache", "find_cache", "list_caches", "load_info", "plan_cache", "target_names",
    "verify_cache",
]
