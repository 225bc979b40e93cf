"""Pages of the shared KV pool: who holds which, what each job has reserved, and the prefix cache.

The K/V tensors themselves live in the model runner; this module only hands out page ids. A job reserves
its worst case at admission, so a running job never fails for lack of pages, and a job that cannot
reserve waits in the queue instead.

The prefix cache shares full pages of prompts across jobs. A prompt is prefilled alone in ``common`` at
offset 0, so the K/V of its first n tokens depend on those tokens and nothing else: a full page is keyed
by a hash of every token up to its end (the previous page's key and its own tokens, as vLLM keys its
blocks) and counted by the jobs holding it. A cached page no job holds is *evictable*: it counts as free
for admission and is taken back, least recently used first, when the free list runs out.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


class PagePool:
    """Page ids: a free list, the reservations of running jobs, and the cached pages.

    Accounting: ``reserved`` is what running jobs may still take for themselves, ``pinned`` the cached
    pages some job holds. Every page a job takes comes out of its reservation, and the free list plus the
    evictable pages always hold at least ``unreserved`` pages, so a take within a reservation never
    fails."""

    def __init__(self, num_pages: int, page_size: int, prefix_cache: bool = True):
        self.num_pages = num_pages
        self.page_size = page_size
        self.prefix_cache = prefix_cache
        self._free = list(range(num_pages - 1, -1, -1))
        self.reserved = 0
        self._offsets = torch.arange(page_size)
        self._page_of: dict[bytes, int] = {}  # key -> cached page
        self._key_of: dict[int, bytes] = {}
        self._refs: dict[int, int] = {}  # cached page -> jobs holding it
        self._evictable: OrderedDict[int, None] = OrderedDict()  # held by none, least recently used first
        self._computing: dict[bytes, str] = {}  # keys some job is prefilling now -> its id
        self.queries = 0  # prompt tokens looked up, over all jobs
        self.hits = 0  # of those, tokens found cached
        self.evictions = 0

    @property
    def pinned(self) -> int:
        return len(self._page_of) - len(self._evictable)

    @property
    def evictable(self) -> int:
        return len(self._evictable)

    @property
    def unreserved(self) -> int:
        """Pages a new job may still reserve: free or evictable, and promised to no running job."""
        return self.num_pages - self.reserved - self.pinned

    @property
    def free_list_len(self) -> int:
        return len(self._free)

    @property
    def whole(self) -> bool:
        """Nothing held, reserved or claimed: every page is free or an evictable cached page."""
        return (
            self.reserved == 0
            and self.pinned == 0
            and not self._computing
            and len(self._free) + len(self._evictable) == self.num_pages
            and len(set(self._free) | set(self._evictable)) == self.num_pages
        )

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def try_reserve(self, pages: int, cached: Sequence[int] = ()) -> bool:
        """Reserve ``pages`` for a job that will hold the ``cached`` pages in place of as many of them:
        it needs room for the rest, and for those of the cached pages that are evictable now."""
        pinning = sum(1 for p in cached if p in self._evictable)
        if pages - len(cached) + pinning > self.unreserved:
            return False
        self.reserved += pages
        return True

    def release(self, pages: int) -> None:
        self.reserved -= pages
        assert self.reserved >= 0

    def alloc(self) -> int:
        if self._free:
            return self._free.pop()
        page, _ = self._evictable.popitem(last=False)
        del self._page_of[self._key_of.pop(page)], self._refs[page]
        self.evictions += 1
        return page

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))

    def slots_of(self, pages: list[int]) -> torch.Tensor:
        """Pool slots of the pages' tokens, as a host tensor: steps are planned on the host."""
        ids = torch.tensor(pages, dtype=torch.long)
        return (ids[:, None] * self.page_size + self._offsets).flatten()

    # -- the prefix cache ---------------------------------------------------------------------------

    def page_keys(self, tokens: list[int]) -> list[bytes]:
        """The key of every full page of ``tokens``: each hashes all tokens up to the page's end."""
        keys, key = [], b""
        for i in range(0, len(tokens) - self.page_size + 1, self.page_size):
            page = array("q", tokens[i : i + self.page_size]).tobytes()
            key = hashlib.blake2b(key + page, digest_size=16).digest()
            keys.append(key)
        return keys

    def cached(self, key: bytes) -> int | None:
        return self._page_of.get(key)

    def computing(self, key: bytes) -> str | None:
        """The job that is prefilling the page of ``key`` now, if any."""
        return self._computing.get(key)

    def claim(self, keys: list[bytes], job_id: str) -> None:
        for key in keys:
            self._computing.setdefault(key, job_id)

    def unclaim(self, job_id: str, keys: list[bytes] | None = None) -> None:
        """Drop the job's claims: on ``keys``, or all of them."""
        for key in list(self._computing) if keys is None else keys:
            if self._computing.get(key) == job_id:
                del self._computing[key]

    def hold(self, pages: list[int]) -> None:
        for page in pages:
            self._refs[page] += 1
            self._evictable.pop(page, None)

    def drop(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._evictable[page] = None  # most recently used

    def publish(self, key: bytes, page: int) -> bool:
        """Cache a page its job has just filled; False if the key is cached already (another job
        computed the same prefix meanwhile), and the page stays the job's own."""
        if key in self._page_of:
            return False
        self._page_of[key], self._key_of[page], self._refs[page] = page, key, 1
        return True


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

    def append_pages(self, pool: PagePool, tokens: list[int], pages: list[int]) -> None:
        """Append full pages that already hold these tokens' K/V (cached ones)."""
        assert len(self.tokens) % pool.page_size == 0 and len(tokens) == len(pages) * pool.page_size
        self.tokens.extend(tokens)
        self.pages.extend(pages)
        self._slots = None

    def clear(self) -> None:
        """Empty it, once its pages have gone back one by one (a step moved into common)."""
        self.tokens, self.pages, self._slots = [], [], None

    def release(self, pool: PagePool, holder: PageHolder) -> None:
        """Return the pages but keep the token ids, so an ended job's views can still be read."""
        holder.give_back(pool, self.pages)
        self.pages, self._slots = [], None


@dataclass
class PageHolder:
    """A job's reservation, the pages it holds out of it, and the cached pages it shares."""

    reserved: int = 0
    held: int = 0
    shared: set[int] = field(default_factory=set)

    def take(self, pool: PagePool) -> int:
        if self.held >= self.reserved:
            raise RuntimeError(f"job exceeded its page reservation of {self.reserved} pages")
        self.held += 1
        return pool.alloc()

    def share(self, pool: PagePool, pages: list[int]) -> None:
        """Hold cached pages in place of as many pages of the reservation."""
        pool.hold(pages)
        self.shared.update(pages)
        self.reserved -= len(pages)
        pool.release(len(pages))

    def publish(self, pool: PagePool, key: bytes, page: int) -> None:
        """Offer one of its full prompt pages to the cache: a published page leaves the reservation for
        the pool's pinned pages, so the sum the admission counts on stays the same."""
        if page not in self.shared and pool.publish(key, page):
            self.shared.add(page)
            self.held -= 1
            self.reserved -= 1
            pool.release(1)

    def give_back(self, pool: PagePool, pages: list[int]) -> None:
        """Free its own pages and drop its references to shared ones, last page first: the head of a
        prefix then stays cached longest, and eviction leaves what remains a prefix still."""
        own = [p for p in pages if p not in self.shared]
        for page in reversed(pages):
            if page in self.shared:
                self.shared.discard(page)
                pool.drop(page)
        self.held -= len(own)
        pool.free(own)


@dataclass
class PromptPages:
    """One job's side of the prefix cache: the keys of the full pages of its prompt (as prefilled into
    ``common``), the cached pages it reads, the pages it claims while computing them, and those it offers
    once their K/V are written."""

    owner: str  # the job's id, on its claims
    tokens: list[int]
    common: Block
    holder: PageHolder
    published: int = 0  # full pages offered to the cache so far
    _keys: list[bytes] | None = None

    def keys(self, pool: PagePool) -> list[bytes]:
        if self._keys is None:
            self._keys = pool.page_keys(self.tokens)
        return self._keys

    def cached_run(self, pool: PagePool) -> list[int]:
        """Cached pages that go on from where ``common`` stands. Never the page the prompt ends in: the job
        computes at least its last prompt token, whose step starts its decoding."""
        done, size = len(self.common), pool.page_size
        if not pool.prefix_cache or done % size:
            return []
        pages = []
        for key in self.keys(pool)[done // size : (len(self.tokens) - 1) // size]:
            page = pool.cached(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def attach(self, pool: PagePool, pages: list[int]) -> list[int]:
        """Put cached pages at the end of ``common``, held in place of as many reserved; their tokens."""
        start = len(self.common)
        ids = self.tokens[start : start + len(pages) * pool.page_size]
        self.common.append_pages(pool, ids, pages)
        self.holder.share(pool, pages)
        pool.hits += len(ids)
        return ids

    def waits(self, pool: PagePool) -> bool:
        """Whether the next prompt page is being computed by another job: then this one waits for it rather
        than computing it too."""
        done, keys = len(self.common), self.keys(pool)
        if not pool.prefix_cache or done % pool.page_size or done // pool.page_size >= len(keys):
            return False
        return pool.computing(keys[done // pool.page_size]) not in (None, self.owner)

    def claim(self, pool: PagePool, end: int) -> None:
        """Claim the prompt pages that ``common`` is about to be written up to ``end`` through."""
        if pool.prefix_cache:
            size = pool.page_size
            pool.claim(self.keys(pool)[len(self.common) // size : -(-end // size)], self.owner)

    def publish(self, pool: PagePool) -> None:
        """Offer the full prompt pages written so far, and drop their claims."""
        if not pool.prefix_cache:
            return
        keys = self.keys(pool)
        full = min(len(self.common) // pool.page_size, len(keys))
        for i in range(self.published, full):
            self.holder.publish(pool, keys[i], self.common.pages[i])
        pool.unclaim(self.owner, keys[self.published : full])
        self.published = full
