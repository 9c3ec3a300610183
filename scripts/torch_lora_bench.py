"""The PyTorch side of `cargo xtask bench lora`: fine-tuning at SmolLM2-135M's shape with
HF transformers' LlamaForCausalLM, a PEFT LoRA adapter or every weight, in float32 eager
mode (sdpa attention) or under torch.compile. BENCH_DEVICE=cuda trains on the GPU with bf16
autocast (f32 master weights, fused AdamW), PyTorch's best ordinary settings there.

Reads DIR/run.json (the engine's LlamaConfig, the LoraConfig or null, optimizer,
schedule, steps, untimed, batch, seq, threads, compile), DIR/init.safetensors (the base
under HF names, the adapter under PEFT's) and DIR/tokens.u32 (steps x batch windows of
seq + 1 tokens). Prints one line per step, then one JSON line: tokens/s over the timed
steps, the losses, torch's version and the settings used.

  python scripts/torch_lora_bench.py DIR

Pinned versions: scripts/requirements-lora.txt.
"""

import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_llama import lr_at  # noqa: E402


def build(run, weights):
    c = run["config"]
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
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    base = {k: v for k, v in weights.items() if not k.startswith("base_model.")}
    missing, unexpected = model.load_state_dict(base, strict=False)
    assert not unexpected, unexpected
    assert all(m == "lm_head.weight" for m in missing), missing
    lora = run["lora"]
    if lora is None:
        params = dict(model.named_parameters())
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        return model, params, decay, no_decay
    from peft import LoraConfig as PeftConfig, get_peft_model

    model = get_peft_model(
        model,
        PeftConfig(
            r=lora["rank"],
            lora_alpha=lora["alpha"],
            lora_dropout=0.0,
            target_modules=[f"{t}_proj" for t in lora["targets"]],
            bias="none",
        ),
    )
    params = {n.replace(".default.weight", ".weight"): p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    return model, params, list(params.values()), []


def main(d):
    run = json.load(open(os.path.join(d, "run.json")))
    device = os.environ.get("BENCH_DEVICE", "cpu")
    cuda = device.startswith("cuda")
    torch.set_num_threads(run["threads"])
    torch.manual_seed(0)
    weights = load_file(os.path.join(d, "init.safetensors"))
    model, params, decay, no_decay = build(run, weights)
    del weights
    model.to(device)
    model.train()
    opt_cfg = run["optimizer"]
    groups = [{"params": decay, "weight_decay": opt_cfg["weight_decay"]}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    kwargs = dict(lr=1.0, betas=(opt_cfg["beta1"], opt_cfg["beta2"]), eps=opt_cfg["eps"])
    try:
        opt = torch.optim.AdamW(groups, fused=True, **kwargs)
        adam = "fused AdamW"
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(groups, **kwargs)
        adam = "AdamW"
    def loss_of(idx, tgt):
        logits = model(input_ids=idx).logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tgt.reshape(-1))

    # Compiled with the loss inside, so inductor fuses the float cross-entropy into the
    # head's product instead of materializing float logits (as torch_gpt.py's model,
    # whose forward returns the loss).
    step_loss = torch.compile(loss_of) if run["compile"] else loss_of
    b, t, steps, untimed = run["batch"], run["seq"], run["steps"], run["untimed"]
    windows = np.fromfile(os.path.join(d, "tokens.u32"), dtype="<u4").astype(np.int64)
    windows = torch.from_numpy(windows.reshape(steps, b, t + 1)).to(device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    trainable = list(params.values())
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        if step == untimed:
            sync()
            start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(run["schedule"], step)
        opt.zero_grad(set_to_none=True)
        idx, tgt = windows[step, :, :-1], windows[step, :, 1:]
        if cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step_loss(idx, tgt)
        else:
            loss = step_loss(idx, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, opt_cfg["grad_clip"])
        opt.step()
        losses.append(loss.item())
        print(f"  pytorch   step {step}: loss {losses[-1]:.4f} ({time.perf_counter() - start:.1f} s since the timed start)", flush=True)
    sync()
    elapsed = time.perf_counter() - start
    precision = "cuda bf16 autocast" if cuda else f"fp32, {torch.get_num_threads()} threads"
    settings = ("torch.compile" if run["compile"] else "eager") + f" {precision}, sdpa, {adam}"
    if run["lora"] is not None:
        settings += f", peft {__import__('peft').__version__}"
    print(json.dumps({
        "tokens_per_s": (steps - untimed) * b * t / elapsed,
        "losses": losses,
        "torch": torch.__version__,
        "settings": settings,
    }))


if __name__ == "__main__":
    main(sys.argv[1])
