"""PyTorch peer of `cargo xtask bench robust`: the same robust combinations of n deltas of
d floats, on the same tensors, timed in this process.

  python scripts/torch_robust.py SPEC.json

SPEC lists the cases (n, d), the rules and the thread count. The deltas are generated
exactly as the Rust side generates them (float32 arithmetic on the same integers), so both
sides combine identical tensors. Each rule is written as a PyTorch user would write it:
torch.sort along the update axis for the median and the trimmed mean, X @ X.T for
Multi-Krum's distances, norms and broadcasting for the clipping rules. Prints one JSON line
per case and rule: the best time of `repeat` runs and the result's sum and L2 norm.
"""

import json
import sys
import time

import torch

spec = json.load(open(sys.argv[1]))
torch.set_num_threads(spec["threads"])
M = 1_000_003


def deltas(n, d):
    x = torch.empty(n, d)
    j = torch.arange(d, dtype=torch.int64)
    for i in range(n):
        k = (i * 7_919 + j * 104_729) % M
        x[i] = (k.to(torch.float32) / float(M) - 0.5) * 1e-2
    return x


def median_of(x):
    s = torch.sort(x, dim=0).values
    n = s.shape[0]
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def position_weights(n, trim):
    # The share of each sorted position kept when `trim` of the weight goes at each end.
    lo, hi = trim * n, (1 - trim) * n
    at = torch.arange(n, dtype=torch.float64)
    return (torch.minimum(at + 1, torch.tensor(hi)) - torch.maximum(at, torch.tensor(lo))).clamp(min=0)


def trimmed_mean(x, trim):
    s = torch.sort(x, dim=0).values
    w = position_weights(x.shape[0], trim).to(torch.float32)
    return (s * w[:, None]).sum(0) / w.sum()


def multi_krum(x, f, m):
    n = x.shape[0]
    g = x @ x.T
    sq = torch.diagonal(g)
    dist = (sq[:, None] + sq[None, :] - 2 * g).clamp(min=0)
    dist.fill_diagonal_(float("inf"))
    k = max(n - f - 2, 1)
    scores = torch.topk(dist, k, dim=1, largest=False).values.sum(1)
    chosen = torch.argsort(scores, stable=True)[: (m or n - f)]
    return x[chosen].mean(0)


def median_1d(v):
    s = torch.sort(v).values
    n = s.shape[0]
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def centered_clip(x, radius, iters):
    v = torch.zeros(x.shape[1])
    for _ in range(iters):
        diff = x - v
        dist = diff.norm(dim=1)
        tau = radius * median_1d(dist)
        scale = torch.clamp(tau / dist, max=1.0)
        v = v + (scale[:, None] * diff).mean(0)
    return v


def norm_clip(x, multiple):
    norms = x.norm(dim=1)
    bound = multiple * median_1d(norms)
    scale = torch.clamp(bound / norms, max=1.0)
    return (scale[:, None] * x).mean(0)


RULES = {
    "median": median_of,
    "trimmed-mean": lambda x: trimmed_mean(x, 0.2),
    "multi-krum": lambda x: multi_krum(x, max(1, x.shape[0] // 5), 0),
    "centered-clip": lambda x: centered_clip(x, 1.0, 3),
    "norm-clip": lambda x: norm_clip(x, 2.0),
}

with torch.inference_mode():
    for n, d in spec["cases"]:
        x = deltas(n, d)
        for name in spec["rules"]:
            best = float("inf")
            for _ in range(spec["repeat"]):
                t = time.perf_counter()
                out = RULES[name](x)
                best = min(best, time.perf_counter() - t)
            print(json.dumps({
                "n": n, "d": d, "rule": name, "seconds": best,
                "sum": float(out.double().sum()), "l2": float(out.double().norm()),
            }), flush=True)
        del x
