"""PyTorch twin of hivetrain's GPT, for golden values and the training benchmark.

The model is written the way a PyTorch user would write it for speed on CPU: nn.Linear
layers, F.scaled_dot_product_attention (fused attention), tanh GELU, torch.optim.AdamW
with its fused implementation (its fastest on CPU), clip_grad_norm_. Weights are read from a
safetensors file with HF GPT-2 names (Conv1D layout [in, out]), so it starts from the
exact weights hivetrain starts from.

  python scripts/torch_gpt.py golden DIR   # loss/grads/steps of the tiny model in DIR
  python scripts/torch_gpt.py bench DIR    # train on the run dumped by `cargo xtask bench train --dump DIR`

BENCH_DEVICE=cuda trains on the GPU with torch.compile (BENCH_COMPILE=0 for eager), bf16
autocast and fused AdamW.

With BENCH_EXACT_CLIP=1 the gradient norm for clipping is summed in float64 instead of by
torch.nn.utils.clip_grad_norm_ in float32 (whose rounding, about 3e-5 relative on the
small model, is what makes the two loss curves drift apart after a loss spike).
"""

import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file


class Block(nn.Module):
    def __init__(self, c, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(c, eps=1e-5)
        self.c_attn = nn.Linear(c, 3 * c)
        self.c_proj = nn.Linear(c, c)
        self.ln_2 = nn.LayerNorm(c, eps=1e-5)
        self.c_fc = nn.Linear(c, 4 * c)
        self.mlp_proj = nn.Linear(4 * c, c)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        x = x + self.c_proj(y)
        x = x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))
        return x


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c = cfg["n_embd"]
        self.wte = nn.Embedding(cfg["vocab_size"], c)
        self.wpe = nn.Embedding(cfg["n_ctx"], c)
        self.h = nn.ModuleList([Block(c, cfg["n_head"]) for _ in range(cfg["n_layer"])])
        self.ln_f = nn.LayerNorm(c, eps=1e-5)

    def forward(self, idx, targets):
        b, t = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    # HF name -> (module parameter, transpose?)
    def hf_params(self):
        out = {"transformer.wte.weight": (self.wte.weight, False), "transformer.wpe.weight": (self.wpe.weight, False)}
        for i, blk in enumerate(self.h):
            p = f"transformer.h.{i}."
            out[p + "ln_1.weight"] = (blk.ln_1.weight, False)
            out[p + "ln_1.bias"] = (blk.ln_1.bias, False)
            out[p + "attn.c_attn.weight"] = (blk.c_attn.weight, True)
            out[p + "attn.c_attn.bias"] = (blk.c_attn.bias, False)
            out[p + "attn.c_proj.weight"] = (blk.c_proj.weight, True)
            out[p + "attn.c_proj.bias"] = (blk.c_proj.bias, False)
            out[p + "ln_2.weight"] = (blk.ln_2.weight, False)
            out[p + "ln_2.bias"] = (blk.ln_2.bias, False)
            out[p + "mlp.c_fc.weight"] = (blk.c_fc.weight, True)
            out[p + "mlp.c_fc.bias"] = (blk.c_fc.bias, False)
            out[p + "mlp.c_proj.weight"] = (blk.mlp_proj.weight, True)
            out[p + "mlp.c_proj.bias"] = (blk.mlp_proj.bias, False)
        out["transformer.ln_f.weight"] = (self.ln_f.weight, False)
        out["transformer.ln_f.bias"] = (self.ln_f.bias, False)
        return out

    def load_hf(self, path):
        tensors = load_file(path)
        with torch.no_grad():
            for name, (param, transpose) in self.hf_params().items():
                t = tensors[name]
                param.copy_(t.t() if transpose else t)


def optimizer(model, opt):
    decay = [p for n, (p, _) in model.hf_params().items() if p.dim() >= 2]
    no_decay = [p for n, (p, _) in model.hf_params().items() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1.0, betas=(opt["beta1"], opt["beta2"]), eps=opt["eps"], fused=True,
    )


def lr_at(s, step):
    if step < s["warmup_steps"]:
        return s["max_lr"] * (step + 1) / s["warmup_steps"]
    if step >= s["total_steps"]:
        return s["min_lr"]
    progress = (step - s["warmup_steps"]) / max(1, s["total_steps"] - s["warmup_steps"])
    return s["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (s["max_lr"] - s["min_lr"])


def load_run(d):
    run = json.load(open(os.path.join(d, "run.json")))
    tokens = torch.from_numpy(np.fromfile(os.path.join(d, "tokens.u16"), dtype="<u2").astype(np.int64))
    offsets = np.fromfile(os.path.join(d, "offsets.u32"), dtype="<u4").astype(np.int64)
    offsets = offsets.reshape(run["steps"], run["batch"])
    model = GPT(run["config"])
    model.load_hf(os.path.join(d, "init.safetensors"))
    return run, tokens, offsets, model


def get_batch(tokens, offs, t):
    idx = torch.stack([tokens[o : o + t] for o in offs])
    tgt = torch.stack([tokens[o + 1 : o + t + 1] for o in offs])
    return idx, tgt


def exact_clip_grad_norm_(params, max_norm):
    """clip_grad_norm_ with the norm summed in float64 (hivetrain's way); see BENCHMARKS.md."""
    params = [p for p in params if p.grad is not None]
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
    coef = min(1.0, max_norm / (norm.item() + 1e-6))
    for p in params:
        p.grad.mul_(coef)
    return norm


def train(run, tokens, offsets, model, timed_from=0):
    exact = os.environ.get("BENCH_EXACT_CLIP") == "1"
    clip = exact_clip_grad_norm_ if exact else torch.nn.utils.clip_grad_norm_
    device = os.environ.get("BENCH_DEVICE", "cpu")
    cuda = device.startswith("cuda")
    model = model.to(device)
    tokens = tokens.to(device)
    # On a GPU, PyTorch's best ordinary settings: torch.compile, bf16 autocast, fused
    # AdamW; losses stay on the device until the end (no sync a step).
    step_model = torch.compile(model) if cuda and os.environ.get("BENCH_COMPILE", "1") == "1" else model
    opt = optimizer(model, run["optimizer"])
    losses, start = [], None
    for step in range(run["steps"]):
        if step == timed_from:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        idx, tgt = get_batch(tokens, offsets[step], run["seq"])
        for g in opt.param_groups:
            g["lr"] = lr_at(run["schedule"], step)
        if cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step_model(idx, tgt)
        else:
            loss = step_model(idx, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if run["optimizer"]["grad_clip"] > 0:
            clip(model.parameters(), run["optimizer"]["grad_clip"])
        opt.step()
        losses.append(loss.detach())
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    timed_tokens = (run["steps"] - timed_from) * run["batch"] * run["seq"]
    return [l.item() for l in losses], timed_tokens / elapsed


def golden(d):
    run, tokens, offsets, model = load_run(d)
    model = model.double()
    idx, tgt = get_batch(tokens, offsets[0], run["seq"])
    loss = model(idx, tgt)
    loss.backward()
    grads = {}
    for name, (param, transpose) in model.hf_params().items():
        g = param.grad.t() if transpose else param.grad
        flat = g.contiguous().view(-1)
        picks = [int(i) for i in np.linspace(0, flat.numel() - 1, 8).round()]
        grads[name] = {"l2": flat.norm().item(), "sum": flat.sum().item(), "at": picks, "values": [flat[i].item() for i in picks]}
    model.zero_grad(set_to_none=True)
    losses, _ = train(run, tokens, offsets, model)
    out = {"loss": loss.item(), "grads": grads, "train_losses": losses, "torch": torch.__version__}
    json.dump(out, open(os.path.join(d, "golden.json"), "w"), indent=1)
    print(f"wrote {os.path.join(d, 'golden.json')}: loss {loss.item():.6f}")


def bench(d):
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    run, tokens, offsets, model = load_run(d)
    losses, tps = train(run, tokens, offsets, model, timed_from=run.get("warmup_untimed", 2))
    device = os.environ.get("BENCH_DEVICE", "cpu")
    print(json.dumps({"tokens_per_s": tps, "losses": losses, "torch": torch.__version__, "threads": threads, "device": device}))


if __name__ == "__main__":
    {"golden": golden, "bench": bench}[sys.argv[1]](sys.argv[2])
