"""Checks that `hivetrain export --hf DIR` loads in HF transformers and computes the same
function: greedy generation from HF must equal `hivetrain generate --temperature 0`.

  hivetrain export --model runs/small --hf /tmp/hf
  hivetrain generate --model runs/small --temperature 0 --max-tokens 30 "KING HENRY." > /tmp/ours.txt
  python scripts/check_hf_export.py /tmp/hf "KING HENRY." /tmp/ours.txt
"""

import sys

from transformers import AutoTokenizer, GPT2LMHeadModel

hf_dir, prompt, ours_path = sys.argv[1], sys.argv[2], sys.argv[3]
model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
tokenizer = AutoTokenizer.from_pretrained(hf_dir)
ids = tokenizer(prompt, return_tensors="pt").input_ids
ours = open(ours_path).read().rstrip("\n")
n_new = len(tokenizer(ours).input_ids) - ids.shape[1]
out = model.generate(ids, max_new_tokens=n_new, do_sample=False, pad_token_id=0)
theirs = tokenizer.decode(out[0])
print("transformers:", repr(theirs))
print("hivetrain:   ", repr(ours))
if theirs != ours:
    sys.exit("MISMATCH")
print("same tokens")
