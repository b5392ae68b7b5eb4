"""Paged KV-cache blocks: a free list, reference counts and prefix reuse by content hash.

A block holds `block_size` positions of one sequence. A full block of prompt positions is
identified by the hash of its content chained to the hash of the block before it, so two
sequences share it only when everything before it is identical too. A block becomes reusable
once its K/V are computed (`mark_computed`), never while its owner is still prefilling it. Image placeholders hash
the input image's content, so two edits of different images never share a block.
Freed blocks keep their hash until they are handed out again, so a later request with the
same prefix can still reuse them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from model.prompts import PromptSequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one position")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> computed block holding that content
        # free blocks, least recently freed first; hashed ones can still be revived
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hit_tokens = 0
        self.queried_tokens = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def blocks_for(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    def prompt_block_hashes(self, prompt: PromptSequence, image_digest: bytes) -> list[bytes]:
        """Chained hashes of the prompt's full blocks, except a last block that ends the prompt.

        The last prompt position is always computed (its hidden state conditions the first image
        token), so a block that contains it is never taken from the cache.
        """
        hashes, parent = [], b""
        placeholders = set(prompt.image_positions)
        shareable = (len(prompt.token_ids) - 1) // self.block_size
        for b in range(shareable):
            start, end = b * self.block_size, (b + 1) * self.block_size
            content = hashlib.sha256(parent)
            content.update(repr(prompt.token_ids[start:end]).encode())
            if placeholders.intersection(range(start, end)):
                content.update(image_digest)
            parent = content.digest()
            hashes.append(parent)
        return hashes

    def cached_prefix(self, hashes: list[bytes]) -> list[int]:
        """Computed blocks holding the longest cached prefix of `hashes`."""
        blocks = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def allocate(self, table: list[int], num_positions: int, hashes: list[bytes]) -> int:
        """Give a sequence blocks for `num_positions`, reusing cached prompt blocks.

        `table` must be empty. Returns how many leading positions are already computed.
        The caller checks `can_allocate` first.
        """
        assert not table
        reused = self.cached_prefix(hashes)
        for block in reused:
            self._reference(block)
        table.extend(reused)
        self.queried_tokens += len(hashes) * self.block_size
        self.hit_tokens += len(reused) * self.block_size
        while len(table) < self.blocks_for(num_positions):
            index = len(table)
            table.append(self._take_free(hashes[index] if index < len(hashes) else None))
        return len(reused) * self.block_size

    def blocks_needed(self, num_positions: int, hashes: list[bytes]) -> int:
        """Free blocks an allocation would consume (cached blocks that are free count too)."""
        reused = self.cached_prefix(hashes)
        revived = sum(1 for block in reused if self.ref_counts[block] == 0)
        return self.blocks_for(num_positions) - len(reused) + revived

    def can_allocate(self, num_positions: int, hashes: list[bytes]) -> bool:
        return self.blocks_needed(num_positions, hashes) <= self.num_free

    def grow(self, table: list[int], num_positions: int) -> bool:
        """Extend `table` to cover `num_positions`; False (and no change) when blocks run out."""
        needed = self.blocks_for(num_positions) - len(table)
        if needed > self.num_free:
            return False
        for _ in range(needed):
            table.append(self._take_free(None))
        return True

    def release(self, table: list[int]) -> None:
        """Drop a sequence's references; blocks nobody uses go back to the free list."""
        for block in table:
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0
            if self.ref_counts[block] == 0:
                self.free[block] = None
        table.clear()

    def _reference(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def mark_computed(self, table: list[int], num_computed: int) -> None:
        """Publish the sequence's full prompt blocks below `num_computed` for reuse."""
        for block in table[: num_computed // self.block_size]:
            content_hash = self.block_hash[block]
            if content_hash is not None and content_hash not in self.cached:
                self.cached[content_hash] = block

    def _take_free(self, content_hash: bytes | None) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.block_hash[block]
        if old is not None and self.cached.get(old) == block:
            del self.cached[old]
        self.block_hash[block] = content_hash  # published by mark_computed once computed
        self.ref_counts[block] = 1
        return block
