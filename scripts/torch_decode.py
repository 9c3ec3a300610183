"""PyTorch peer of `cargo xtask bench decode`: greedy decoding with a KV cache, from the
same weights and prompt as hivetrain, timed in this process.

  python scripts/torch_decode.py DIR

DIR holds an HF GPT-2 export (config.json, model.safetensors) and decode.json (prompt
ids, tokens to generate, threads, repeats). Two ordinary ways a PyTorch user decodes:
transformers' `generate` (greedy, use_cache) and a plain loop over the model with
`past_key_values`; both under torch.inference_mode with SDPA attention and the same thread
count. Prints one JSON line: the tokens (which must be the same both ways) and the best
tokens/s of each.
"""

import json
import os
import sys
import time

import torch
import transformers
from transformers import GPT2LMHeadModel

d = sys.argv[1]
spec = json.load(open(os.path.join(d, "decode.json")))
torch.set_num_threads(spec["threads"])
model = GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa").eval()
prompt = torch.tensor([spec["prompt"]], dtype=torch.long)
n = spec["tokens"]


def generate():
    with torch.inference_mode():
        out = model.generate(
            prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, use_cache=True
        )
    return out[0, prompt.shape[1]:].tolist()


def loop():
    tokens = []
    with torch.inference_mode():
        out = model(prompt, use_cache=True)
        past = out.past_key_values
        next_id = int(out.logits[0, -1].argmax())
        tokens.append(next_id)
        for _ in range(n - 1):
            out = model(torch.tensor([[next_id]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            next_id = int(out.logits[0, -1].argmax())
            tokens.append(next_id)
    return tokens


result = {"torch": torch.__version__, "transformers": transformers.__version__}
for name, fn in (("generate", generate), ("loop", loop)):
    fn()  # warm-up
    best = 0.0
    for _ in range(spec["repeat"]):
        t = time.perf_counter()
        tokens = fn()
        best = max(best, len(tokens) / (time.perf_counter() - t))
    result[name + "_tokens"] = tokens
    result[name + "_tokens_per_s"] = best
print(json.dumps(result))
