"""PyTorch peer of `cargo xtask bench decode`: greedy decoding with a KV cache, from the
same weights and prompt as hivetrain, timed in this process.

  python scripts/torch_decode.py DIR

DIR holds an HF GPT-2 export (config.json, model.safetensors) and decode.json (prompt
ids, tokens to generate, threads, repeats); or, when decode.json has "llama" (the
engine's LlamaConfig), a Llama's model.safetensors under HF names (SmolLM2's GGUF
dequantized to f32 by hivetrain), built here as an HF LlamaForCausalLM. Two ordinary ways a PyTorch user decodes:
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


def llama(c):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden"],
        intermediate_size=c["intermediate"],
        num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"],
        num_key_value_heads=c["kv_heads"],
        head_dim=c["head_dim"],
        rms_norm_eps=c["rms_eps"],
        rope_theta=c["rope_theta"],
        max_position_embeddings=c["max_seq"],
        tie_word_embeddings=c["tie_embeddings"],
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        # No end token: both sides generate exactly `tokens` (hivetrain's loop has no
        # stop either), and min_new_tokens then masks nothing.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(load_file(os.path.join(d, "model.safetensors")), strict=False)
    assert not unexpected, unexpected
    assert all(m == "lm_head.weight" for m in missing), missing
    if c["tie_embeddings"]:
        model.tie_weights()
    model.generation_config.eos_token_id = None
    return model.float().eval()


if "llama" in spec:
    model = llama(spec["llama"])
else:
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
