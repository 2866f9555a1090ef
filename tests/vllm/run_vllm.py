"""Runs vLLM's offline LLM in this process as a test asks (a JSON spec on argv[1]) and prints one JSON line:
the platform vLLM resolved, every generate() round's outputs, and, on our platform, what our worker's runner
saw (preemptions, resumptions, prefix-cache hits, partial prefill chunks). Tests start it in a fresh process per
platform: vLLM resolves its platform once per process."""

import json
import sys

from vllm import LLM, SamplingParams
from vllm.platforms import current_platform
from vllm.sampling_params import StructuredOutputsParams


def main():
    spec = json.loads(sys.argv[1])
    llm = LLM(**spec["engine"])
    rounds = []
    for rnd in spec["rounds"]:
        each = rnd["params"] if isinstance(rnd["params"], list) else [rnd["params"]]  # one, or one per prompt
        params = []
        for sp in map(dict, each):
            if "structured_outputs" in sp:
                sp["structured_outputs"] = StructuredOutputsParams(**sp["structured_outputs"])
            params.append(SamplingParams(**sp))
        params = params if isinstance(rnd["params"], list) else params[0]
        prompts = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in rnd["prompts"]]
        outs = llm.generate(prompts, params, use_tqdm=False)
        rounds.append([{
            "samples": [{"token_ids": list(c.token_ids), "text": c.text,
                         "logprobs": None if c.logprobs is None else
                         [{str(t): lp.logprob for t, lp in pos.items()} for pos in c.logprobs]}
                        for c in o.outputs],
            "prompt_logprobs": None if o.prompt_logprobs is None else
            [None if pos is None else {str(t): lp.logprob for t, lp in pos.items()} for pos in o.prompt_logprobs],
        } for o in outs])
    stats = None
    try:  # in-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0): our worker is reachable
        worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
        stats = getattr(getattr(worker, "runner", None), "stats", None)
        if stats is not None:
            stats = dict(stats, num_kv_blocks=worker.engine.num_kv_blocks,
                         bytes_per_block=worker.get_cache_block_size_bytes(),
                         async_scheduling=bool(llm.llm_engine.vllm_config.scheduler_config.async_scheduling))
    except AttributeError:
        pass
    print("RESULT " + json.dumps({"platform": type(current_platform).__name__,
                                  "device_name": current_platform.get_device_name(),
                                  "rounds": rounds, "stats": stats}))


if __name__ == "__main__":
    main()
