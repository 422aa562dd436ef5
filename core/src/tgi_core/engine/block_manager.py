"""The KV-cache block manager: pure Python, no torch.

Blocks of ``block_size`` token slots are handed out from a free list and reference
counted. With prefix caching, every block a sequence has filled is registered under a
chained hash of all the tokens up to its end; a new sequence whose prompt starts with
the same tokens reuses those blocks instead of recomputing them. A block nobody holds
keeps its content (and its hash) in an LRU pool until a fresh block is needed.
Sequences forked from one another (n > 1) share blocks; a shared block that is not full
is copied before it is written (copy-on-write).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence as Seq

from tgi_core.engine.sequence import Sequence


def chain_hash(previous: int | None, tokens: Seq[int]) -> int:
    """The hash of a full block given the hash of everything before it.

    SHA-256 (truncated to 128 bits), not Python's ``hash``: another request must not be
    able to craft a collision and read or poison cached blocks.
    """
    data = ",".join(map(str, (previous if previous is not None else -1, *tokens)))
    return int.from_bytes(hashlib.sha256(data.encode()).digest()[:16], "big")


class BlockManager:
    """Allocates, shares and recycles the blocks of the paged KV cache."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))  # no content worth keeping
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, cached; LRU first
        self.by_hash: dict[int, int] = {}
        self.prefix_hit_tokens = 0  # prompt tokens served from the cache (counted on admission)
        self.pending_copies: list[tuple[int, int]] = []  # copy-on-write (source, destination)

    # -- accounting --------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free, or cached and unreferenced)."""
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_cached(self) -> int:
        """Unreferenced blocks that still hold a reusable prefix."""
        return len(self.evictable)

    @property
    def num_used(self) -> int:
        """Blocks held by live sequences."""
        return self.num_blocks - self.num_free

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks ``seq`` lacks to hold ``num_tokens`` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    # -- allocation --------------------------------------------------------------------

    def _take(self) -> int:
        if self.free_ids:
            block = self.free_ids.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)  # least recently used
            old = self.block_hash[block]
            if old is not None and self.by_hash.get(old) == block:
                del self.by_hash[old]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def _hold(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self.evictable.pop(block, None)
        self.ref_counts[block] += 1

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} freed twice"
        if self.ref_counts[block] == 0:
            if self.block_hash[block] is not None:
                self.evictable[block] = None
            else:
                self.free_ids.append(block)

    def match_prefix(self, seq: Sequence) -> int:
        """Reuse cached blocks for the start of a sequence that holds none; returns tokens.

        At most ``len - 1`` tokens are matched: the last one is always computed, so the
        step yields the logits that choose the next token.
        """
        assert not seq.block_table and seq.num_computed == 0
        if not self.prefix_caching or seq.encoder_ids:  # cross K/V depend on the source
            return 0
        previous: int | None = None
        hashes = seq.extra.setdefault("block_hashes", [])
        for start in range(0, len(seq.token_ids) - 1 - self.block_size + 1, self.block_size):
            digest = chain_hash(previous, seq.token_ids[start : start + self.block_size])
            block = self.by_hash.get(digest)
            if block is None:
                break
            self._hold(block)
            seq.block_table.append(block)
            hashes.append(digest)
            previous = digest
        matched = len(seq.block_table) * self.block_size
        seq.num_computed = matched
        return matched

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Give ``seq`` the blocks to hold ``num_tokens`` tokens (and its source, for an
        encoder-decoder model); False (and nothing taken) when there are not enough free
        blocks. Copies a shared partial last block first."""
        needed = self.blocks_needed(seq, seq.kv_positions(num_tokens))
        copy_on_write = self._shared_partial_tail(seq, num_tokens)
        if needed + copy_on_write > self.num_free:
            return False
        if copy_on_write:
            source = seq.block_table[-1]
            target = self._take()
            self.pending_copies.append((source, target))
            self._release(source)
            seq.block_table[-1] = target
        for _ in range(needed):
            seq.block_table.append(self._take())
        return True

    def _shared_partial_tail(self, seq: Sequence, num_tokens: int) -> int:
        if not seq.block_table or seq.num_computed % self.block_size == 0:
            return 0
        writes_into_tail = num_tokens > seq.num_computed
        return int(writes_into_tail and self.ref_counts[seq.block_table[-1]] > 1)

    def commit(self, seq: Sequence) -> None:
        """Register the blocks ``seq`` has completely computed under their prefix hash."""
        if not self.prefix_caching or seq.encoder_ids:
            return
        hashes: list[int] = seq.extra.setdefault("block_hashes", [])
        full = seq.num_computed // self.block_size
        while len(hashes) < full:
            index = len(hashes)
            start = index * self.block_size
            digest = chain_hash(
                hashes[-1] if hashes else None, seq.token_ids[start : start + self.block_size]
            )
            hashes.append(digest)
            block = seq.block_table[index]
            if self.block_hash[block] is None and digest not in self.by_hash:
                self.block_hash[block] = digest
                self.by_hash[digest] = block

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let ``child`` share every block of ``parent`` (n > 1: one prompt, many samples)."""
        assert not child.block_table
        for block in parent.block_table:
            self._hold(block)
        child.block_table = list(parent.block_table)
        child.num_computed = parent.num_computed
        child.extra["block_hashes"] = list(parent.extra.get("block_hashes", []))

    def free(self, seq: Sequence) -> None:
        """Give back every block of ``seq``; it holds none afterwards."""
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []
        seq.num_computed = 0
        seq.extra.pop("block_hashes", None)

    def take_copies(self) -> list[tuple[int, int]]:
        """The copy-on-write block copies the runner must do before the next forward."""
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def check(self) -> None:
        """Assert the bookkeeping is consistent (tests)."""
        held = [b for b in range(self.num_blocks) if self.ref_counts[b] > 0]
        assert len(held) + len(self.free_ids) + len(self.evictable) == self.num_blocks
        assert not set(held) & (set(self.free_ids) | set(self.evictable))
        assert len(set(self.free_ids)) == len(self.free_ids)
        for digest, block in self.by_hash.items():
            assert self.block_hash[block] == digest
