"""Test harness: drives metal_engine.Engine with hand-built vLLM-style step descriptors.

Blocks are handed out from a shuffled free list, so every test also exercises non-contiguous,
out-of-order block tables. (The real scheduler and KV-cache manager are the generation layer's.)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Seq:
    tokens: list  # every token so far (prompt + generated)
    num_cached: int = 0  # tokens whose K/V are in the cache
    blocks: list = field(default_factory=list)


class Harness:
    def __init__(self, engine, seed: int = 0):
        self.engine = engine
        self.bs = engine.block_size
        self.free = list(range(engine.num_kv_blocks))
        random.Random(seed).shuffle(self.free)

    def ensure_blocks(self, seq: Seq, n_tokens: int):
        need = -(-n_tokens // self.bs)
        while len(seq.blocks) < need:
            seq.blocks.append(self.free.pop())

    def release(self, seq: Seq):
        self.free.extend(seq.blocks)
        seq.blocks = []

    def step(self, work, all_logits: bool = False):
        """work: list of (Seq, n_new) -- feed the next n_new uncached tokens of each sequence.
        Returns per sequence the logits [n_new or 1, vocab] (all rows if all_logits)."""
        toks, pos, slots, qsl, lens, rows = [], [], [], [0], [], []
        for seq, n in work:
            start = seq.num_cached
            end = start + n
            self.ensure_blocks(seq, end)
            for p in range(start, end):
                toks.append(seq.tokens[p])
                pos.append(p)
                slots.append(seq.blocks[p // self.bs] * self.bs + p % self.bs)
            if all_logits:
                rows.extend(range(qsl[-1], qsl[-1] + n))
            else:
                rows.append(qsl[-1] + n - 1)
            qsl.append(qsl[-1] + n)
            lens.append(end)
        width = max(len(s.blocks) for s, _ in work)
        bt = np.zeros((len(work), width), dtype=np.int32)
        for i, (s, _) in enumerate(work):
            bt[i, : len(s.blocks)] = s.blocks
        logits = self.engine.step(toks, pos, qsl, lens, bt, slots, rows)
        out, r = [], 0
        for seq, n in work:
            k = n if all_logits else 1
            out.append(logits[r : r + k])
            r += k
            seq.num_cached += n
        return out

    def prefill_and_decode(self, prompts, decode_steps: int, batched: bool = True, chunk: int = 0, forced=None):
        """Prefills every prompt (in chunks of `chunk` tokens if > 0; logits at every prompt position),
        then decodes greedily, or feeds forced[i] (decode_steps tokens per prompt: teacher forcing, so two
        engines that break a near-tie differently still see the same inputs). Returns per prompt
        (logits [len(prompt) + decode_steps - 1... ], tokens)."""
        seqs = [Seq(tokens=list(p)) for p in prompts]
        logits = [[] for _ in prompts]

        def run(group):
            # prefill
            pending = {id(s): len(s.tokens) for s in group}
            while any(s.num_cached < pending[id(s)] for s in group):
                work = []
                for s in group:
                    left = pending[id(s)] - s.num_cached
                    if left > 0:
                        work.append((s, min(left, chunk) if chunk else left))
                outs = self.step(work, all_logits=True)
                for (s, _), o in zip(work, outs):
                    logits[seqs.index(s)].append(o)
            # decode
            for _ in range(decode_steps):
                for s in group:
                    i = seqs.index(s)
                    if forced is not None:
                        s.tokens.append(int(forced[i][len(s.tokens) - len(prompts[i])]))
                    else:
                        s.tokens.append(int(np.argmax(logits[i][-1][-1])))
                outs = self.step([(s, 1) for s in group], all_logits=True)
                for s, o in zip(group, outs):
                    logits[seqs.index(s)].append(o)

        if batched:
            run(seqs)
        else:
            for s in seqs:
                run([s])
        result = [(np.concatenate(l, axis=0), s.tokens) for l, s in zip(logits, seqs)]
        for s in seqs:
            self.release(s)
        return result
