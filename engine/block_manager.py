"""Pages of the shared KV pool: who holds which, and what each job has reserved.

The K/V tensors themselves live in the model runner; this module only hands out page ids. A job reserves
its worst case at admission, so a running job never fails for lack of pages, and a job that cannot
reserve waits in the queue instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class PagePool:
    def __init__(self, num_pages: int, page_size: int):
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(num_pages - 1, -1, -1))
        self.reserved = 0
        self._offsets = torch.arange(page_size)

    @property
    def unreserved(self) -> int:
        return self.num_pages - self.reserved

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def try_reserve(self, pages: int) -> bool:
        if pages > self.unreserved:
            return False
        self.reserved += pages
        return True

    def release(self, pages: int) -> None:
        self.reserved -= pages
        assert self.reserved >= 0

    def alloc(self) -> int:
        return self._free.pop()

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))

    @property
    def free_list_len(self) -> int:
        return len(self._free)

    def slots_of(self, pages: list[int]) -> torch.Tensor:
        """Pool slots of the pages' tokens, as a host tensor: steps are planned on the host."""
        ids = torch.tensor(pages, dtype=torch.long)
        return (ids[:, None] * self.page_size + self._offsets).flatten()


@dataclass
class Block:
    """A run of tokens whose keys are rotated as if the block started at position 0."""

    name: str
    tokens: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    _slots: torch.Tensor | None = None  # cached slots of all pages; rebuilt when a page is added

    def __len__(self) -> int:
        return len(self.tokens)

    def slots(self, pool: PagePool, start: int = 0, end: int | None = None) -> torch.Tensor:
        if self._slots is None:
            self._slots = pool.slots_of(self.pages)
        return self._slots[start : len(self.tokens) if end is None else end]

    def extend(self, pool: PagePool, tokens: list[int], holder: PageHolder) -> torch.Tensor:
        """Append tokens, taking pages from the holder's reservation; returns their slots."""
        start = len(self.tokens)
        self.tokens.extend(tokens)
        while len(self.pages) * pool.page_size < len(self.tokens):
            self.pages.append(holder.take(pool))
            self._slots = None
        return self.slots(pool, start)

    def release(self, pool: PagePool, holder: PageHolder) -> None:
        """Return the pages but keep the token ids, so an ended job's views can still be read."""
        holder.give_back(pool, self.pages)
        self.pages, self._slots = [], None


@dataclass
class PageHolder:
    """A job's reservation and the pages it holds out of it."""

    reserved: int = 0
    held: int = 0

    def take(self, pool: PagePool) -> int:
        if self.held >= self.reserved:
            raise RuntimeError(f"job exceeded its page reservation of {self.reserved} pages")
        self.held += 1
        return pool.alloc()

    def give_back(self, pool: PagePool, pages: list[int]) -> None:
        self.held -= len(pages)
        pool.free(pages)
