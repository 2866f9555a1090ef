"""Runs the C++ example on a tiny random Llama checkpoint and checks its greedy tokens against
transformers. Usage: python tests/check_cpp_example.py <path to greedy_generate>"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent / "python"))
from tiny_models import make_tiny_checkpoint  # noqa: E402


def main(binary: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp) / "llama", "llama", seed=11)
        prompt, n = [3, 1, 4, 1, 5, 9, 2, 6], 12
        out = subprocess.run([binary, str(path), str(n), *map(str, prompt)], capture_output=True, text=True, check=True)
        ours = [int(t) for t in out.stdout.strip().splitlines()[-1].split()]
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None)
        ref = ref[0, len(prompt):].tolist()
    print("C++ example greedy tokens:", ours)
    if ours != ref:
        print("transformers greedy tokens:", ref, file=sys.stderr)
        return 1
    print("C++ example: 1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
