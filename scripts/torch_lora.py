"""Golden values of a LoRA adapter on the tiny random Llama, from HF transformers + PEFT.

hivetrain's LoRA path (crates/engine/src/lora.rs and the Llama CPU backend) is checked
against this script's output by crates/engine/tests/it/golden.rs. The base is the tiny
Llama of scripts/torch_llama.py, read from its committed golden directory (init weights
and token windows); on it PEFT puts `LoraConfig(r=4, lora_alpha=8, lora_dropout=0,
target_modules=[q, k, v, o, gate, up, down]_proj)`. PEFT initializes A
(kaiming_uniform) from a fixed seed; B, which PEFT starts at zero, is set to small
random values so that A's gradients are not zero. The script writes into DIR:

  run.json                  the LoRA config as the engine's LoraConfig serializes it
  adapter_init.safetensors  the adapter's initial A and B under PEFT's names, float32
  golden.json               per variant ("untied", "tied"): the loss and, for every adapter
                            tensor, the gradient's L2 norm, sum and 8 sampled values on the
                            first batch; the losses of three AdamW steps (the adapter
                            alone in the optimizer) and the loss after them

Everything is computed in float64 from the float32 initial weights, as torch_llama.py
does.

  python scripts/torch_lora.py crates/engine/tests/golden/llama crates/engine/tests/golden/lora

Pinned versions: scripts/requirements-lora.txt (requirements-llama.txt plus peft).
"""

import json
import os
import sys

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_llama import ENGINE_CONFIG, OPTIMIZER, SCHEDULE, STEPS, BATCH, SEQ, hf_model, loss_of, lr_at  # noqa: E402

SEED = 4321
RANK, ALPHA = 4, 8
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]
B_STD = 0.05


def peft_name(name):
    """PEFT's parameter name without the adapter's name, as adapter_model.safetensors has it."""
    return name.replace(".default.weight", ".weight")


def lora_model(llama_dir, tie):
    model = hf_model(tie)
    weights = load_file(os.path.join(llama_dir, "init.safetensors"))
    if tie:
        del weights["lm_head.weight"]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    assert all(m == "lm_head.weight" for m in missing) and (tie or not missing), missing
    config = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=[f"{t}_proj" for t in TARGETS],
        bias="none",
    )
    return get_peft_model(model, config)


def init_adapter(llama_dir, d):
    """PEFT's A from a fixed seed, B small and random; saved under PEFT's names."""
    torch.manual_seed(SEED)
    model = lora_model(llama_dir, tie=False)
    adapter = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(torch.randn_like(p) * B_STD)
        adapter[peft_name(name)] = p.detach().float().contiguous()
    save_file(adapter, os.path.join(d, "adapter_init.safetensors"))
    return adapter


def variant(llama_dir, adapter, tie, windows):
    model = lora_model(llama_dir, tie)
    params = {peft_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    assert set(params) == set(adapter), set(params) ^ set(adapter)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(adapter[name])
    model = model.double()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all("lora_" not in n for n in frozen)

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

    # Every adapter tensor is a matrix: all of them decay, as in the engine.
    opt = torch.optim.AdamW(
        list(params.values()),
        lr=1.0,
        betas=(OPTIMIZER["beta1"], OPTIMIZER["beta2"]),
        eps=OPTIMIZER["eps"],
        weight_decay=OPTIMIZER["weight_decay"],
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


def main(llama_dir, d):
    os.makedirs(d, exist_ok=True)
    windows = np.fromfile(os.path.join(llama_dir, "tokens.u16"), dtype="<u2").astype(np.int64)
    windows = torch.from_numpy(windows.reshape(STEPS, BATCH, SEQ + 1))
    adapter = init_adapter(llama_dir, d)
    json.dump({"lora": {"rank": RANK, "alpha": float(ALPHA), "targets": TARGETS}}, open(os.path.join(d, "run.json"), "w"), indent=1)
    out = {
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__,
    }
    for name, tie in [("untied", False), ("tied", True)]:
        out[name] = variant(llama_dir, adapter, tie, windows)
        print(f"{name}: loss {out[name]['loss']:.6f} steps {out[name]['train_losses']} after {out[name]['loss_after']:.6f}")
    json.dump(out, open(os.path.join(d, "golden.json"), "w"), indent=1)
    print(f"wrote {d}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
