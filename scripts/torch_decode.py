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

decode.json's "device" ("cpu", the default, or "cuda") and "dtype" ("float32", the
default, or "bfloat16") say where and in what the model runs: hivetrain on a GPU is
compared with PyTorch on the same GPU in the same precision. On a GPU a third ordinary
way is timed when transformers supports it for the model: `generate` with a static KV
cache, whose forward pass transformers compiles by itself (its documented fast path for
GPU decoding; "compiled_auto" says whether it did, "compiled_error" why it did not run).
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
device = torch.device(spec.get("device", "cpu"))
dtype = getattr(torch, spec.get("dtype", "float32"))
model = model.to(device=device, dtype=dtype)
prompt = torch.tensor([spec["prompt"]], dtype=torch.long, device=device)
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
            out = model(torch.tensor([[next_id]], device=device), past_key_values=past, use_cache=True)
            past = out.past_key_values
            next_id = int(out.logits[0, -1].argmax())
            tokens.append(next_id)
    return tokens


def compiled():
    with torch.inference_mode():
        out = model.generate(
            prompt,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            cache_implementation="static",
        )
    return out[0, prompt.shape[1]:].tolist()


result = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "device": str(device),
    "dtype": str(dtype),
}


def timed(name, fn):
    fn()  # warm-up
    best = 0.0
    for _ in range(spec["repeat"]):
        t = time.perf_counter()
        tokens = fn()
        best = max(best, len(tokens) / (time.perf_counter() - t))
    result[name + "_tokens"] = tokens
    result[name + "_tokens_per_s"] = best


timed("generate", generate)
timed("loop", loop)
if device.type == "cuda":
    # generate with a static KV cache, which transformers compiles by itself on a GPU
    # ("compiled_auto" says whether it did); last, since compiling changes the model.
    try:
        compiled()  # compiles
        result["compiled_auto"] = hasattr(model, "_compiled_call")
        print(f"static-cache generate compiled by transformers: {result['compiled_auto']}", file=sys.stderr)
        timed("compiled", compiled)
    except Exception as e:  # an unsupported model or cache: say so
        result["compiled_error"] = f"{type(e).__name__}: {e}"[:300]
print(json.dumps(result))
