"""The Worker vLLM's executor drives (vLLM 0.32's worker contract, vllm/v1/worker/worker_base.py): it loads
our Engine, reports the KV cache it needs, allocates exactly the blocks vLLM's KV-cache manager hands out,
and runs each SchedulerOutput through the ModelRunner (model_runner.py).

Call order, as vLLM makes it: init_device, load_model, get_kv_cache_spec, get_supported_kv_cache_layouts,
determine_available_memory, initialize_from_config (the Engine is built here, with vLLM's num_blocks),
compile_or_warm_up_model, get_supported_tasks; then per step execute_model and sample_tokens.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from vllm.logger import init_logger
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT
from vllm.v1.worker.worker_base import CompilationTimes, WorkerBase

from metal_engine import _core
from metal_engine.config import EngineConfig
from metal_engine.engine import Engine
from metal_engine.llm_engine import resolve_model_path
from metal_engine.vllm.model_runner import ModelRunner
from metal_engine.vllm.platform import engine_backend

logger = init_logger("vllm." + __name__)  # under vLLM's logger, which vLLM configures

_TORCH_TO_OURS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_CACHE_DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
                 "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}
_OURS_TO_TORCH = {v: k for k, v in _TORCH_TO_OURS.items()}


class MetalEngineWorker(WorkerBase):
    def __init__(self, vllm_config, local_rank: int, rank: int, distributed_init_method: str,
                 is_driver_worker: bool = False):
        super().__init__(vllm_config, local_rank, rank, distributed_init_method, is_driver_worker)
        self.engine = None
        self.runner = None
        self.model_path = None
        self.model_cfg = None  # _core.ModelConfig, from config.json before the Engine exists

    # ----------------------------------------------------------------------------- start-up
    def init_device(self) -> None:
        self.device = torch.device("cpu")
        cfg = EngineConfig(backend=engine_backend()).resolve()
        self.backend = cfg.select_backend()
        self.scratch_pool_mb = cfg.scratch_pool_mb

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        """Resolves the checkpoint (a folder, a .gguf through the conversion cache, an MLX folder) and reads its
        config; the weights load with the KV cache in initialize_from_config, once vLLM has sized it."""
        if load_dummy_weights:
            raise ValueError("load_format='dummy' is not supported by metal_engine: it loads the checkpoint's "
                             "own weights")
        mc = self.model_config
        model = mc.model
        if not Path(model).exists():
            raise FileNotFoundError(f"model {model!r} is not a local folder or .gguf file: metal_engine under vLLM "
                                    "loads local checkpoints (download the model first)")
        self.model_path = resolve_model_path(model, progress=False)
        self.model_cfg = _core.ModelConfig.from_json((Path(self.model_path) / "config.json").read_text(),
                                                     str(Path(self.model_path) / "config.json"))
        self.dtype = _TORCH_TO_OURS.get(mc.dtype)
        if self.dtype is None:
            raise ValueError(f"dtype {mc.dtype}: metal_engine runs float32, float16 or bfloat16")
        cache_dtype = self.cache_config.cache_dtype
        if cache_dtype not in _CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={cache_dtype!r}: metal_engine's KV cache is auto, float32, float16 "
                             "or bfloat16")
        self.kv_dtype = _CACHE_DTYPES[cache_dtype] or self.dtype

    def get_kv_cache_spec(self):
        """One spec per layer, as our cache lays them out: [blocks, block_size, kv_heads, head_dim] for K and
        for V. When every layer slides over one window (Mistral, Phi-3) a SlidingWindowSpec: vLLM's
        SlidingWindowManager then frees the blocks that leave the window and names them by its null block in
        later block tables (our attention kernels start at the window, so they never read those entries). A
        model with any full-attention layer reports full attention everywhere: one block table serves all our
        layers, so vLLM must keep every block (our attention applies the windows itself)."""
        from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

        m = self.model_cfg
        common = dict(block_size=self.cache_config.block_size, num_kv_heads=m.num_kv_heads, head_size=m.head_dim,
                      dtype=_OURS_TO_TORCH[self.kv_dtype])
        if m.uniform_sliding_window > 0:
            spec = SlidingWindowSpec(**common, sliding_window=m.uniform_sliding_window)
        else:
            spec = FullAttentionSpec(**common)
        return {f"model.layers.{i}.self_attn.attn": spec for i in range(m.num_layers)}

    def get_supported_kv_cache_layouts(self) -> list[str]:
        return ["LBNHC"]  # per layer [block, token in block, kv head, head_dim] (vLLM's legacy NHD)

    def _bytes_per_block(self) -> int:
        m = self.model_cfg
        item = torch.tensor([], dtype=_OURS_TO_TORCH[self.kv_dtype]).element_size()
        return 2 * m.num_layers * self.cache_config.block_size * m.num_kv_heads * m.head_dim * item

    def determine_available_memory(self) -> int:
        """The KV cache's bytes: kv_cache_memory_bytes when given, else gpu_memory_utilization's share of our
        KV budget (the engine's kv_cache_memory, or enough for max_model_len tokens when that is more)."""
        cc = self.cache_config
        if cc.kv_cache_memory_bytes is not None:
            return int(cc.kv_cache_memory_bytes)
        from metal_engine.config import native_default

        bs = cc.block_size
        need = -(-self.model_config.max_model_len // bs) * self._bytes_per_block()
        # never less than one max_model_len request plus vLLM's null block: vLLM refuses to start below that
        return max(int(cc.gpu_memory_utilization * max(native_default("kv_cache_memory"), need)),
                   need + self._bytes_per_block())

    def initialize_from_config(self, kv_cache_config) -> None:
        if len(kv_cache_config.kv_cache_groups) != 1:
            raise ValueError(f"metal_engine runs one KV-cache group, vLLM planned "
                             f"{len(kv_cache_config.kv_cache_groups)}")
        num_blocks = int(kv_cache_config.num_blocks)
        t0 = time.perf_counter()
        self.engine = Engine(self.model_path, dtype=self.dtype, kv_cache_dtype=self.kv_dtype, backend=self.backend,
                             block_size=self.cache_config.block_size, num_kv_blocks=num_blocks,
                             scratch_pool_mb=self._scratch_mb())
        if self.engine.num_kv_blocks != num_blocks:
            raise RuntimeError(f"the engine holds {self.engine.num_kv_blocks} KV blocks, vLLM planned {num_blocks}")
        self.runner = ModelRunner(self.engine, self.model_cfg.vocab_size, self.model_config.max_model_len,
                                  seed=self.model_config.seed or 0,
                                  async_scheduling=bool(self.scheduler_config.async_scheduling))
        logger.info("metal_engine: %s on %s, %s weights, %s KV cache of %d blocks x %d tokens (%.1f s)",
                    self.model_path, self.engine.backend, self.engine.dtype, self.engine.kv_cache_dtype, num_blocks,
                    self.engine.block_size, time.perf_counter() - t0)

    def _scratch_mb(self) -> int:
        """The per-step arena: VLLM_METAL_SCRATCH_POOL_MB when set, else enough for vLLM's token budget per step
        (its CPU defaults are 2048 / 4096 tokens, more than our own LLM's 256), with room to spare: a rough
        upper bound of a step's activations (f32) and of one engine call's logits rows (ModelRunner.MAX_ROWS)."""
        from metal_engine.config import ENV_SCRATCH_POOL_MB, _env_int

        if _env_int(ENV_SCRATCH_POOL_MB) is not None:
            return self.scratch_pool_mb
        m = self.model_cfg
        per_token = 4 * (12 * m.hidden_size + 4 * m.intermediate_size + 4 * (m.num_heads + 2 * m.num_kv_heads) * m.head_dim)
        need = self.scheduler_config.max_num_batched_tokens * per_token * 5 // 4 + ModelRunner.MAX_ROWS * m.vocab_size * 4
        return max(self.scratch_pool_mb, -(-need // (1 << 20)))

    def compile_or_warm_up_model(self) -> CompilationTimes:
        return CompilationTimes(language_model=0.0, encoder=0.0)

    def get_supported_tasks(self):
        return ("generate",)

    # ----------------------------------------------------------------------------------- steps
    def execute_model(self, scheduler_output):
        if not self.runner.execute(scheduler_output):
            return EMPTY_MODEL_RUNNER_OUTPUT  # a step with no tokens (it carries only finished ids)
        return None  # vLLM calls sample_tokens next, with the grammar bitmask when a request has one

    def sample_tokens(self, grammar_output):
        return self.runner.sample(grammar_output)

    def execute_dummy_batch(self) -> None:
        pass  # data parallelism only; never > 1 here (the platform refuses it)

    def take_draft_token_ids(self):
        return None

    # ------------------------------------------------------------------------------ the rest
    def get_model(self):
        return self.engine

    def get_cache_block_size_bytes(self) -> int:
        return self._bytes_per_block()

    def update_max_model_len(self, max_model_len: int) -> None:
        self.model_config.max_model_len = max_model_len
        if self.runner is not None:
            self.runner.max_model_len = max_model_len

    def check_health(self) -> None:
        return

    def add_lora(self, lora_request) -> bool:
        raise ValueError("LoRA adapters are not supported by metal_engine")

    def remove_lora(self, lora_id: int) -> bool:
        return False

    def pin_lora(self, lora_id: int) -> bool:
        return False

    def list_loras(self) -> set:
        return set()

    def profile(self, is_start: bool = True, profile_prefix=None) -> None:
        if self.engine is not None:
            self.engine._engine.set_profiling(bool(is_start))

    def shutdown(self) -> None:
        self.runner = None
        self.engine = None

