"""Engine: a checkpoint loaded onto one backend, stepped with explicit vLLM-style batch descriptors."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from metal_engine import _core


class Engine:
    """A Hugging Face checkpoint (Llama, Mistral, Qwen2) loaded on a backend with a paged KV cache.

    ``step`` runs one forward over a flattened batch that may mix prefill chunks and decode tokens of
    many sequences, exactly as described by its arguments (vLLM v1's ``query_start_loc``,
    ``seq_lens``, ``block_tables``, ``slot_mapping``), and returns fp32 logits of the requested rows.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        dtype: Optional[str] = None,
        activation_dtype: Optional[str] = None,
        kv_cache_dtype: Optional[str] = None,
        backend: Optional[str] = None,
        block_size: Optional[int] = None,
        kv_cache_memory: Optional[int] = None,
        num_kv_blocks: Optional[int] = None,
        scratch_pool_mb: Optional[int] = None,
        num_threads: Optional[int] = None,
    ):
        """Every knob left None takes its one default, defined in include/metal_engine/config.h
        (``_core.EngineConfig()``): dtype "auto" (bfloat16 checkpoints in bfloat16, float32 and float16 ones
        in float16), backend "cpu", block_size 16, kv_cache_memory 256 MiB (bytes), scratch_pool_mb 512
        (env VLLM_METAL_SCRATCH_POOL_MB), num_threads 0 (all cores)."""
        path = os.fspath(model)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"model path {path!r} is not a folder: pass a Hugging Face checkpoint folder "
                "(config.json + *.safetensors)"
            )
        cfg = _core.EngineConfig()
        for name, value, kind in (("backend", backend, str), ("dtype", dtype, str),
                                  ("activation_dtype", activation_dtype, str),
                                  ("kv_cache_dtype", kv_cache_dtype, str), ("block_size", block_size, int),
                                  ("kv_cache_memory", kv_cache_memory, int), ("num_kv_blocks", num_kv_blocks, int),
                                  ("scratch_pool_mb", scratch_pool_mb, int), ("num_threads", num_threads, int)):
            if value is not None:
                setattr(cfg, name, kind(value).replace("torch.", "") if kind is str else kind(value))
        self.path = path
        self._engine = _core.Engine.from_checkpoint(path, cfg)

    @property
    def model_config(self) -> _core.ModelConfig:
        return self._engine.model_config

    @property
    def engine_config(self) -> _core.EngineConfig:
        return self._engine.engine_config

    @property
    def dtype(self) -> str:
        return self._engine.dtype

    @property
    def kv_cache_dtype(self) -> str:
        return self._engine.kv_cache_dtype

    @property
    def activation_dtype(self) -> str:
        """The residual stream's and every activation's dtype (logits are always float32)."""
        return self._engine.activation_dtype

    @property
    def backend(self) -> str:
        return self._engine.backend

    @property
    def num_kv_blocks(self) -> int:
        return self._engine.num_kv_blocks

    @property
    def block_size(self) -> int:
        return self._engine.block_size

    @property
    def scratch_high_water_bytes(self) -> int:
        return self._engine.scratch_high_water_bytes

    def step(
        self,
        token_ids,
        positions,
        query_start_loc,
        seq_lens,
        block_tables,
        slot_mapping,
        logits_indices: Optional[np.ndarray] = None,
        greedy: bool = False,
    ) -> np.ndarray:
        """One forward. Shapes: token_ids, positions, slot_mapping [num_tokens]; query_start_loc
        [num_seqs + 1]; seq_lens [num_seqs]; block_tables [num_seqs, width]; logits_indices [rows]
        (default: the last token of every sequence). Returns float32 [rows, vocab_size]; with greedy=True,
        each row's greedy token instead (argmax on the device, int32 [rows]), without reading logits back."""
        run = self._engine.step_greedy if greedy else self._engine.step
        return run(*self._arrays(token_ids, positions, query_start_loc, seq_lens, block_tables, slot_mapping,
                                 logits_indices))

    def submit(self, token_ids, positions, query_start_loc, seq_lens, block_tables, slot_mapping,
               logits_indices: Optional[np.ndarray] = None, greedy: bool = False, prev_token_rows=None) -> int:
        """The same forward, submitted without waiting for it: returns a ticket for ``collect``. Up to two steps are
        in flight, so the next one is encoded while the device runs this one. ``prev_token_rows`` [num_tokens]: a
        row r >= 0 takes the greedy token of logits row r of the step submitted just before (a greedy submit), on
        the device; its ``token_ids`` entry is then a placeholder."""
        arrays = self._arrays(token_ids, positions, query_start_loc, seq_lens, block_tables, slot_mapping,
                              logits_indices)
        prev = None if prev_token_rows is None else np.ascontiguousarray(prev_token_rows, dtype=np.int32)
        return self._engine.submit(*arrays, greedy, prev)

    def collect(self, ticket: int) -> np.ndarray:
        """Waits for the oldest submitted step (``ticket``); returns what ``step`` would have: logits float32
        [rows, vocab], or int32 [rows] greedy tokens for a greedy submit."""
        return self._engine.collect(ticket)

    @property
    def steps_in_flight(self) -> int:
        return self._engine.steps_in_flight

    @staticmethod
    def _arrays(token_ids, positions, query_start_loc, seq_lens, block_tables, slot_mapping, logits_indices):
        qsl = np.ascontiguousarray(query_start_loc, dtype=np.int32)
        if logits_indices is None:
            logits_indices = qsl[1:] - 1
        bt = np.ascontiguousarray(block_tables, dtype=np.int32)
        if bt.ndim != 2:
            raise ValueError(f"block_tables must be 2-D [num_seqs, width], got shape {bt.shape}")
        return (np.ascontiguousarray(token_ids, dtype=np.int32), np.ascontiguousarray(positions, dtype=np.int32), qsl,
                np.ascontiguousarray(seq_lens, dtype=np.int32), bt, np.ascontiguousarray(slot_mapping, dtype=np.int64),
                np.ascontiguousarray(logits_indices, dtype=np.int32))
