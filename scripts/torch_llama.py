"""Golden values of a tiny random Llama from HF transformers' LlamaForCausalLM.

hivetrain's Llama engine (crates/engine/src/llama) is checked against this script's
output by crates/engine/tests/it/golden.rs. The script builds a tiny LlamaForCausalLM
(hidden 64, 2 layers, 4 query heads over 2 key/value heads, intermediate 128,
vocabulary 300, rope_theta 10000, sequences of 16), initializes it the HF way from a
fixed seed, and writes into DIR:

  run.json            the engine's LlamaConfig, optimizer, schedule, steps, batch, seq
  init.safetensors    the initial weights under HF names, float32 (lm_head included; the
                      tied variant reads the same file and ignores lm_head)
  tokens.u16          steps x batch x (seq + 1) token ids, little-endian u16
  golden.json         per variant ("untied", "tied"): the loss and, for every tensor, the
                      gradient's L2 norm, sum and 8 sampled values on the first batch; the
                      losses of three AdamW steps and the loss after them

Everything is computed in float64 (model.double(), eager attention) from the float32
initial weights, so the reference is exact to far below the engine's float32 rounding.
HF computes the rotary cos/sin tables in float32 even in a float64 model; that rounding
(about 1e-7 relative) is left as HF has it.

  python scripts/torch_llama.py crates/engine/tests/golden/llama

Pinned versions: scripts/requirements-llama.txt.
"""

import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

SEED = 1234
STEPS, BATCH, SEQ = 3, 2, 16
ENGINE_CONFIG = {
    "hidden": 64,
    "intermediate": 128,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "head_dim": 16,
    "vocab_size": 300,
    "rope_theta": 10000.0,
    "rms_eps": 1e-5,
    "tie_embeddings": False,
    "max_seq": SEQ,
}
# engine::OptimizerConfig::default() and engine::LrSchedule::cosine(3e-3, 3).
OPTIMIZER = {"beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "grad_clip": 1.0}
SCHEDULE = {"max_lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "total_steps": STEPS}


def hf_model(tie):
    c = ENGINE_CONFIG
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
        tie_word_embeddings=tie,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config)


def lr_at(s, step):
    if step < s["warmup_steps"]:
        return s["max_lr"] * (step + 1) / s["warmup_steps"]
    if step >= s["total_steps"]:
        return s["min_lr"]
    progress = (step - s["warmup_steps"]) / max(1, s["total_steps"] - s["warmup_steps"])
    return s["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (s["max_lr"] - s["min_lr"])


def loss_of(model, window):
    idx, tgt = window[:, :-1], window[:, 1:]
    logits = model(input_ids=idx).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1))


def variant(d, tie, windows):
    model = hf_model(tie)
    weights = load_file(os.path.join(d, "init.safetensors"))
    if tie:
        del weights["lm_head.weight"]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    assert all(m == "lm_head.weight" for m in missing) and (tie or not missing), missing
    model = model.double()
    params = dict(model.named_parameters())  # a tied lm_head is not listed again

    loss = loss_of(model, windows[0])
    loss.backward()
    grads = {}
    for name, p in params.items():
        flat = p.grad.reshape(-1)
        picks = [int(i) for i in np.linspace(0, flat.numel() - 1, 8).round()]
        grads[name] = {
            "l2": flat.norm().item(),
            "sum": flat.sum().item(),
            "at": picks,
            "values": [flat[i].item() for i in picks],
        }
    model.zero_grad(set_to_none=True)

    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": OPTIMIZER["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1.0,
        betas=(OPTIMIZER["beta1"], OPTIMIZER["beta2"]),
        eps=OPTIMIZER["eps"],
    )
    losses = []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_at(SCHEDULE, step)
        opt.zero_grad(set_to_none=True)
        step_loss = loss_of(model, windows[step])
        step_loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), OPTIMIZER["grad_clip"])
        opt.step()
        losses.append(step_loss.item())
    with torch.no_grad():
        after = loss_of(model, windows[0]).item()
    return {"loss": loss.item(), "grads": grads, "train_losses": losses, "loss_after": after}


def main(d):
    os.makedirs(d, exist_ok=True)
    torch.manual_seed(SEED)
    model = hf_model(tie=False)
    save_file({n: p.detach().contiguous() for n, p in model.state_dict().items()}, os.path.join(d, "init.safetensors"))
    windows = torch.randint(0, ENGINE_CONFIG["vocab_size"], (STEPS, BATCH, SEQ + 1), dtype=torch.int64)
    windows.numpy().astype("<u2").tofile(os.path.join(d, "tokens.u16"))
    run = {
        "config": ENGINE_CONFIG,
        "optimizer": OPTIMIZER,
        "schedule": SCHEDULE,
        "steps": STEPS,
        "batch": BATCH,
        "seq": SEQ,
    }
    json.dump(run, open(os.path.join(d, "run.json"), "w"), indent=1)
    out = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    for name, tie in [("untied", False), ("tied", True)]:
        out[name] = variant(d, tie, windows)
        print(f"{name}: loss {out[name]['loss']:.6f} steps {out[name]['train_losses']} after {out[name]['loss_after']:.6f}")
    json.dump(out, open(os.path.join(d, "golden.json"), "w"), indent=1)
    print(f"wrote {d}")


if __name__ == "__main__":
    main(sys.argv[1])
