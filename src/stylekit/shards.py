"""Shards: `--shard K/N` runs a stable K-th of N parts of a batch, for any job scheduler.

A job belongs to shard `1 + h mod N`, where h is the first 8 bytes of the SHA-256 of its
input's relative path (the part mirrored under the output folder; a generated image's file
name). The hash depends on that path alone, so adding or removing files never moves another file
to another shard, and N copies of one command (a Slurm array, a Kubernetes indexed job,
`xargs -P`) plan the same batch, seeds included, and each writes its own part of it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

from stylekit.errors import UsageError

J = TypeVar("J")  # a `media.batch.Job`


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` (1 ≤ K ≤ N) as (K, N); anything else is a UsageError."""
    k, slash, n = text.partition("/")
    try:
        pair = (int(k), int(n)) if slash else None
    except ValueError:
        pair = None
    if pair is None or not 1 <= pair[0] <= pair[1]:
        raise UsageError(f"--shard {text!r}: give K/N with 1 ≤ K ≤ N, e.g. --shard 2/8")
    return pair


def shard_of(rel: str, n: int) -> int:
    """The shard (1..n) of a job whose input's relative path is `rel` (POSIX form)."""
    digest = hashlib.sha256(rel.encode("utf-8")).digest()
    return 1 + int.from_bytes(digest[:8], "big") % n


def in_shard(jobs: Sequence[J], k: int, n: int) -> list[J]:
    """The jobs of shard `k` of `n`, in their order."""
    return [job for job in jobs if shard_of(job.rel.as_posix(), n) == k]
