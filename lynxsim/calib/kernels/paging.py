"""Block tables of a paged KV cache, as a long-running server's allocator leaves them. Imports torch.

A sequence of ``n`` cached tokens holds ``ceil(n / page_size)`` pages; after hours of serving, the pages a
sequence holds are scattered over the pool, not contiguous. Every paged cache that calibration, validation and
the kernel tests build takes its pages from ``shuffled_block_table``, so all of them read the cache the way a
server's decode kernels do (one page lookup per ``page_size`` tokens, pages in random order).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def shuffled_block_table(pages_per_seq: Sequence[int], num_pages: int, seed: int = 0,
                         shuffle: bool = True) -> torch.Tensor:
    """``[B, max(pages_per_seq)]`` int32 on the CPU: sequence ``b``'s pages in its first ``pages_per_seq[b]``
    columns (zeros after), drawn without repetition from a pool of ``num_pages`` pages in a random order seeded
    by ``seed`` (in order 0, 1, ... with ``shuffle=False``)."""
    needed = sum(pages_per_seq)
    if needed > num_pages:
        raise ValueError(f"{needed} pages needed, pool has {num_pages}")
    gen = torch.Generator()
    gen.manual_seed(seed)
    order = torch.randperm(num_pages, generator=gen) if shuffle else torch.arange(num_pages)
    table = torch.zeros(len(pages_per_seq), max(pages_per_seq, default=1), dtype=torch.int32)
    first = 0
    for row, count in enumerate(pages_per_seq):
        table[row, :count] = order[first:first + count].to(torch.int32)
        first += count
    return table
