"""What vLLM's examples/offline_inference/basic scripts do, through the same vLLM APIs (not vLLM's files):
basic.py (LLM(model=...), SamplingParams(temperature=0.8, top_p=0.95), generate), generate.py (EngineArgs'
command line turned into LLM(**vars(args)), get_default_sampling_params) and chat.py (llm.chat on one
conversation and on a batch of ten). Prints one JSON line for the test."""

import json
import sys

from vllm import LLM, EngineArgs, SamplingParams
from vllm.utils.argparse_utils import FlexibleArgumentParser

PROMPTS = ["Hello, my name is", "The president of the United States is", "The capital of France is",
           "The future of AI is"]
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hello! How can I assist you today?"},
    {"role": "user", "content": "Write an essay about the importance of higher education."},
]


def main():
    parser = FlexibleArgumentParser()
    engine_group = parser.add_argument_group("Engine arguments")
    EngineArgs.add_cli_args(engine_group)
    sampling_group = parser.add_argument_group("Sampling parameters")
    sampling_group.add_argument("--max-tokens", type=int)
    args = vars(parser.parse_args())
    max_tokens = args.pop("max_tokens")
    llm = LLM(**args)  # generate.py / chat.py: every engine argument from the command line

    basic = llm.generate(PROMPTS, SamplingParams(temperature=0.8, top_p=0.95, max_tokens=max_tokens))
    sp = llm.get_default_sampling_params()
    sp.max_tokens = max_tokens
    generate = llm.generate(PROMPTS, sp)
    chat_sp = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    chat_one = llm.chat(CONVERSATION, chat_sp, use_tqdm=False)
    chat_batch = llm.chat([CONVERSATION for _ in range(10)], chat_sp, use_tqdm=True)
    from vllm.platforms import current_platform

    print("RESULT " + json.dumps({
        "platform": type(current_platform).__name__,
        "basic": [o.outputs[0].text for o in basic], "generate": [o.outputs[0].text for o in generate],
        "chat_one": [o.outputs[0].text for o in chat_one], "chat_batch": [o.outputs[0].text for o in chat_batch],
        "prompts": [o.prompt for o in basic]}))


if __name__ == "__main__":
    sys.exit(main())
