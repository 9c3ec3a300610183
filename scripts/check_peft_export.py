"""Checks that what `hivetrain model export` and `hivetrain model merge` write loads in
PyTorch and computes what hivetrain computes: greedy tokens of

  hivetrain (the engine running base + adapter, unmerged: `model chat --adapter --ids`)
  = peft.PeftModel.from_pretrained(LlamaForCausalLM(base HF dir), exported PEFT dir)
  = LlamaForCausalLM(merged HF dir)

for a plain prompt and a chat prompt, and the base alone equal between hivetrain and
transformers on the base HF dir (`model merge` without an adapter). It also records
whether the adapter changes the base's tokens (a zero adapter would prove nothing).

Usage (a venv outside the repository):
    python3 -m venv /work/venv-peft
    /work/venv-peft/bin/pip install -r scripts/requirements-peft.txt
    cargo build --release -p cli -p xtask
    target/release/xtask random-adapter --base GGUF --out /tmp/pe/adapter.safetensors --b 0.1
    /work/venv-peft/bin/python scripts/check_peft_export.py target/release/hivetrain GGUF \
        /tmp/pe/adapter.safetensors /tmp/pe/work > crates/models/tests/golden/peft_export.json

Exits non-zero if any tokens differ.
"""

import json
import os
import shutil
import subprocess
import sys

import peft
import torch
import transformers
from peft import PeftModel
from transformers import AutoTokenizer, LlamaForCausalLM

NEW_TOKENS = 32
PLAIN = "The three primary colors are"
CHAT = "What is the capital of France?"


def run(*args):
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    return out.stdout


def hivetrain_ids(hivetrain, base, adapter, kind, text):
    args = [hivetrain, "model", "chat", "--model", base, "--ids", "--max-tokens", str(NEW_TOKENS)]
    if adapter:
        args += ["--adapter", adapter]
    if kind == "plain":
        args.append("--plain")
    return json.loads(run(*args, text))


def greedy(model, ids, eos):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    return out[0, len(ids):].tolist()


def main():
    hivetrain, base, adapter, work = sys.argv[1:5]
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    base_dir = os.path.join(work, "base-hf")
    peft_dir = os.path.join(work, "adapters", "random")
    merged_dir = os.path.join(work, "merged-hf")
    run(hivetrain, "model", "merge", "--base", base, "--out", base_dir)
    run(hivetrain, "model", "export", "--base", base, "--adapter", adapter, "--out", peft_dir)
    run(hivetrain, "model", "merge", "--base", base, "--adapter", peft_dir, "--out", merged_dir)

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    eos = tokenizer.eos_token_id
    base_model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    chat_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT}], tokenize=False, add_generation_prompt=True
    )
    prompts = [("plain", PLAIN, PLAIN), ("chat", CHAT, chat_text)]
    cases = []
    for kind, given, text in prompts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ours_base = hivetrain_ids(hivetrain, base, None, kind, given)
        ours_file = hivetrain_ids(hivetrain, base, adapter, kind, given)
        ours_peft_dir = hivetrain_ids(hivetrain, base, peft_dir, kind, given)
        cases.append(
            {
                "kind": kind,
                "prompt": text,
                "prompt_ids_equal": ids == ours_base["prompt_ids"] == ours_file["prompt_ids"],
                "hivetrain_base": ours_base["new_ids"],
                "torch_base": greedy(base_model, ids, eos),
                "hivetrain_adapter": ours_file["new_ids"],
                "hivetrain_adapter_from_peft_dir": ours_peft_dir["new_ids"],
                "ids": ids,
            }
        )
    peft_model = PeftModel.from_pretrained(base_model, peft_dir).eval()
    n_lora = sum(1 for n, _ in peft_model.named_parameters() if "lora_" in n)
    for case in cases:
        case["peft"] = greedy(peft_model, case["ids"], eos)
    del peft_model, base_model
    merged = LlamaForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ok = True
    for case in cases:
        case["merged"] = greedy(merged, case.pop("ids"), eos)
        case["adapter_changes_tokens"] = case["hivetrain_adapter"] != case["hivetrain_base"]
        case["base_equal"] = case["hivetrain_base"] == case["torch_base"]
        case["peft_equal"] = (
            case["hivetrain_adapter"] == case["peft"] == case["hivetrain_adapter_from_peft_dir"]
        )
        case["merged_equal"] = case["merged"] == case["hivetrain_adapter"]
        case["text_base"] = tokenizer.decode(case["hivetrain_base"])
        case["text_adapter"] = tokenizer.decode(case["hivetrain_adapter"])
        ok &= case["prompt_ids_equal"] and case["base_equal"] and case["peft_equal"]
        ok &= case["merged_equal"] and case["adapter_changes_tokens"]
    json.dump(
        {
            "made_by": f"scripts/check_peft_export.py, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, float32, greedy",
            "adapter": os.path.basename(adapter),
            "peft_lora_tensors": n_lora,
            "max_new_tokens": NEW_TOKENS,
            "all_equal": ok,
            "cases": cases,
        },
        sys.stdout,
        indent=1,
        ensure_ascii=False,
    )
    print()
    if not ok:
        sys.exit("MISMATCH")


if __name__ == "__main__":
    main()
