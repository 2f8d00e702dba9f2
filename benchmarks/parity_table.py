"""Render parity.jsonl records (benchmarks/gpu_parity.py) as the markdown table used in docs/parity.md.

    python benchmarks/parity_table.py docs/parity_runs/*.jsonl
"""

import json
import sys

COLUMNS = [("case", "case"), ("params", "params"), ("dtype", "dtype"), ("tp", "TP"), ("pp", "PP"),
           ("chunked_tp", "saved at TP"), ("positions", "positions"), ("max_rel_diff", "max|Δ|/max|logit|"),
           ("top1_agreement", "top-1"), ("top1_agreement_decisive", "top-1 (decisive)"), ("top5_overlap", "top-5"),
           ("kl_mean", "KL mean"), ("kl_max", "KL max"), ("cosine_min", "cos min"),
           ("fp32ref_hf_bf16_kl_mean", "KL fp32→HF-bf16"), ("fp32ref_megatron_bf16_kl_mean", "KL fp32→Meg-bf16"),
           ("ok", "pass")]


def cell(key, v):
    if v is None:
        return "—"
    if key == "params":
        return f"{v / 1e9:.2f}B"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def main(paths):
    print("| " + " | ".join(h for _, h in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            if "error" in r:
                continue
            print("| " + " | ".join(cell(k, r.get(k)) for k, _ in COLUMNS) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
