"""KV-cache block accounting in the manner of vLLM v1: a BlockPool of reference-counted blocks with an
LRU free queue, and a KVCacheManager that gives requests their blocks (allocate_slots / free) and
reuses cached blocks of shared prefixes (automatic prefix caching).

Full blocks are identified by a hash chain over their tokens: hash(block i) is the SHA-256 of hash(block i-1),
the request's cache salt and block i's tokens, so equal hashes mean equal whole prefixes (and salts), and a
crafted prompt cannot collide into another user's blocks (vLLM moved to SHA-256 after CVE-2025-25183; Python's
hash() of a tuple is not collision-resistant). A freed block keeps its hash and its
contents until it is handed out again, so a later request with the same prefix can take it back;
the free queue evicts least recently used first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional

import numpy as np


def block_hash(parent: Optional[bytes], tokens, salt: Optional[str]) -> bytes:
    """SHA-256 over the parent block's hash, the cache salt (length-prefixed) and the block's tokens."""
    h = hashlib.sha256(parent if parent is not None else b"\0" * 32)
    s = b"" if salt is None else str(salt).encode()
    h.update(len(s).to_bytes(8, "little") + s)
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.digest()


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash = None  # SHA-256 of the whole prefix up to this block once it is full and cached

    def __repr__(self):
        return f"KVCacheBlock({self.block_id}, ref_cnt={self.ref_cnt})"


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict = OrderedDict((b.block_id, b) for b in self.blocks)  # LRU first
        self.cached: dict = {}  # block hash -> block

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def get_new_blocks(self, n: int) -> list:
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} blocks with {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:  # evict its cached contents
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def get_cached_block(self, block_hash) -> Optional[KVCacheBlock]:
        return self.cached.get(block_hash)

    def touch(self, blocks):
        """Takes a reference on cache hits, pulling free ones out of the eviction queue."""
        for b in blocks:
            if b.ref_cnt == 0:
                self.free_queue.pop(b.block_id)
            b.ref_cnt += 1

    def cache_block(self, block: KVCacheBlock, block_hash):
        if block.block_hash is not None:
            return
        if block_hash in self.cached:  # another block holds the same prefix; keep the first
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def free_blocks(self, blocks):
        """Drops one reference each; blocks reaching zero join the free queue's tail (most recent).
        Pass a request's blocks in reverse so its tail blocks are evicted before its prefix."""
        for b in blocks:
            b.ref_cnt -= 1
            if b.ref_cnt < 0:
                raise RuntimeError(f"block {b.block_id} freed more often than allocated")
            if b.ref_cnt == 0:
                self.free_queue[b.block_id] = b


class BlockTableRow:
    """One request's block ids as an int32 array appended to in place (vLLM's BlockTable.append_row): a step
    reads `ids` without rebuilding it, so the per-step cost is the blocks added, not the context."""

    __slots__ = ("_buf", "n")

    def __init__(self):
        self._buf = np.zeros(8, dtype=np.int32)
        self.n = 0

    def extend(self, block_ids):
        k = len(block_ids)
        if self.n + k > len(self._buf):
            grown = np.zeros(max(2 * len(self._buf), self.n + k), dtype=np.int32)
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n: self.n + k] = block_ids
        self.n += k

    def fill(self, upto: int, block_id: int):
        """Entries [0, upto) name block_id (blocks freed out of a sliding window)."""
        self._buf[:upto] = block_id

    @property
    def ids(self) -> np.ndarray:
        return self._buf[: self.n]


class KVCacheManager:
    """`enable_caching` False: no block is hashed or cached, except those of requests that share their prompt
    with sibling samples (n > 1: `request.hash_blocks`).

    `sliding_window` > 0 (every layer of the model attends to that many keys: Mistral, Phi-3; vLLM's
    SlidingWindowManager): a block whose tokens have all left the window of the next token to compute is freed
    as the request goes on, so a request holds about window / block_size blocks however long it runs. Its entry
    in the block table is left pointing at a block the request still holds (the attention kernels start at the
    window, so it is never read, and no other request's block is named). Models with any full-attention layer
    (Gemma 2 and 3, Qwen2 with max_window_layers) keep every block: one block table serves all layers."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True, sliding_window: int = 0):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.sliding_window = sliding_window
        self.pool = BlockPool(num_blocks)
        self.req_to_blocks: dict = {}
        self.req_to_hashes: dict = {}
        self.req_to_table: dict = {}       # request id -> BlockTableRow
        self.req_to_num_cached: dict = {}  # request id -> how many of its leading blocks are cached (vLLM's
                                           # num_cached_block): each step caches only the newly full ones
        self.req_to_num_skipped: dict = {}  # request id -> its leading blocks freed (out of the sliding window)

    def _hashes_blocks(self, request) -> bool:
        return self.enable_caching or getattr(request, "hash_blocks", False)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def _block_hashes(self, request, upto_tokens: int) -> list:
        """Hashes of the request's full blocks among its first `upto_tokens` tokens (memoised)."""
        hashes = self.req_to_hashes.setdefault(request.request_id, [])
        bs = self.block_size
        while (len(hashes) + 1) * bs <= upto_tokens:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            tokens = [request.token(j) for j in range(i * bs, (i + 1) * bs)]
            hashes.append(block_hash(parent, tokens, request.cache_salt))
        return hashes

    def get_computed_blocks(self, request) -> tuple[list, int]:
        """The longest run of cached full blocks that starts the request's tokens, leaving at least
        one token to compute (its logits are needed). Returns (blocks, number of tokens they hold)."""
        if request.params.prompt_logprobs is not None or not self._hashes_blocks(request):
            return [], 0  # prompt logprobs need every prompt position's logits
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(request, max_blocks * self.block_size)[:max_blocks]
        if self.sliding_window > 0:
            return self._sliding_window_hits(hashes)
        hits = []
        for h in hashes:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def _sliding_window_hits(self, hashes) -> tuple[list, int]:
        """With a sliding window only the blocks the window of the first token to compute reaches are needed
        (vLLM's SlidingWindowManager, searching from the right): the longest k such that the blocks before k that
        window reaches are cached. Hits then start with None for the blocks before it (freed, never read)."""
        bs, w = self.block_size, self.sliding_window
        cached = [self.pool.get_cached_block(h) for h in hashes]
        for k in range(len(cached), 0, -1):
            first = max(0, k * bs - w + 1) // bs  # the block of the earliest key token k * bs attends to
            if all(b is not None for b in cached[first:k]):
                return [None] * first + cached[first:k], k * bs
        return [], 0

    def remove_skipped_blocks(self, request, num_computed_tokens: int):
        """With a sliding window: frees the request's leading blocks that hold no key the next token's window
        reaches (positions < num_computed_tokens - sliding_window + 1), in reverse so the newer ones are
        evicted last, as vLLM's SlidingWindowManager does."""
        if self.sliding_window <= 0:
            return
        rid = request.request_id
        blocks = self.req_to_blocks.get(rid)
        if not blocks:
            return
        first_useful = max(0, num_computed_tokens - self.sliding_window + 1) // self.block_size
        first_useful = min(first_useful, len(blocks) - 1)  # the block of the next token's slot stays
        done = self.req_to_num_skipped.get(rid, 0)
        if first_useful <= done:
            return
        self.pool.free_blocks(reversed(blocks[done:first_useful]))
        for i in range(done, first_useful):
            blocks[i] = None
        self.req_to_table[rid].fill(first_useful, blocks[first_useful].block_id)  # every freed entry
        self.req_to_num_skipped[rid] = first_useful

    def num_held_blocks(self, request) -> int:
        """The blocks the request holds now (not those freed out of its sliding window)."""
        return sum(b is not None for b in self.req_to_blocks.get(request.request_id, []))

    def allocate_slots(self, request, num_new_tokens: int, new_computed_blocks=()) -> Optional[list]:
        """Makes room for `num_new_tokens` more tokens of the request (after any cache-hit blocks),
        or returns None, changing nothing but the blocks that left its sliding window, if the pool cannot."""
        self.remove_skipped_blocks(request, request.num_computed_tokens)
        blocks = self.req_to_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        need = -(-total // self.block_size) - len(blocks) - len(new_computed_blocks)
        hit_blocks = [b for b in new_computed_blocks if b is not None]  # None: out of the sliding window
        evictable_hits = sum(1 for b in hit_blocks if b.ref_cnt == 0)
        if need > self.pool.num_free_blocks - evictable_hits:
            return None
        self.pool.touch(hit_blocks)
        rid = request.request_id
        blocks = self.req_to_blocks.setdefault(rid, blocks)
        table = self.req_to_table.get(rid)
        if table is None:
            table = self.req_to_table[rid] = BlockTableRow()
        new = self.pool.get_new_blocks(max(need, 0))
        added = [*new_computed_blocks, *new]
        blocks.extend(added)
        lead = 0  # sliding-window hits start with the blocks out of the window (None: freed already)
        while lead < len(added) and added[lead] is None:
            lead += 1
        if added:  # the freed entries name the first block held, as remove_skipped_blocks has them
            table.extend([added[lead].block_id] * lead + [b.block_id for b in added[lead:]])
        if lead:
            self.req_to_num_skipped[rid] = lead
        if self._hashes_blocks(request):
            # Cache the blocks that will be full once this step has run, from the first not yet cached.
            self._cache_full_blocks(request, total, from_start=bool(new_computed_blocks))
        return new

    def _cache_full_blocks(self, request, num_tokens: int, from_start: bool = False):
        """Caches the request's blocks full within its first `num_tokens` tokens, from the first not yet cached. A
        block whose last token is still to come from the device (async scheduling) waits for a later call."""
        rid = request.request_id
        blocks = self.req_to_blocks.get(rid, [])
        start = 0 if from_start else self.req_to_num_cached.get(rid, 0)
        full = min(num_tokens, request.num_tokens, len(blocks) * self.block_size) // self.block_size
        if full > start:
            hashes = self._block_hashes(request, full * self.block_size)
            for i in range(start, full):
                if blocks[i] is not None:
                    self.pool.cache_block(blocks[i], hashes[i])
            self.req_to_num_cached[rid] = full

    def block_ids(self, request) -> list:
        """The request's block ids, those freed out of its sliding window named by its first held block."""
        blocks = self.req_to_blocks.get(request.request_id, [])
        held = next((b.block_id for b in blocks if b is not None), None)
        return [held if b is None else b.block_id for b in blocks]

    def block_table(self, request) -> np.ndarray:
        """The request's block ids, int32 [num_blocks] (a view of its BlockTableRow; valid until it grows)."""
        table = self.req_to_table.get(request.request_id)
        return table.ids if table is not None else np.zeros(0, dtype=np.int32)

    def free(self, request):
        rid = request.request_id
        if self._hashes_blocks(request) and rid in self.req_to_blocks:  # blocks that filled as its last tokens came
            self._cache_full_blocks(request, request.num_computed_tokens)
        blocks = self.req_to_blocks.pop(rid, [])
        self.pool.free_blocks(reversed([b for b in blocks if b is not None]))
        self.req_to_num_skipped.pop(rid, None)
        self.req_to_hashes.pop(rid, None)
        self.req_to_table.pop(rid, None)
        self.req_to_num_cached.pop(rid, None)
