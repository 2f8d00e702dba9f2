"""Render parity.jsonl records (benchmarks/gpu_parity.py) as the markdown table used in docs/parity.md.

    python benchmarks/parity_table.py docs/parity_runs/*.jsonl
"""

import json
import sys

# Records written before the fp64 yardstick (docs/parity_runs/2026-11-24-*) carry the first set of keys; newer
# ones the second. A column a record lacks shows as a dash.
COLUMNS = [("case", "case"), ("params", "params"), ("dtype", "dtype"), ("tp", "TP"), ("pp", "PP"),
           ("chunked_tp", "saved at TP"), ("positions", "positions"), ("max_rel_diff", "max|Δ|/max|logit|"),
           ("top1_agreement", "top-1"), ("top1_agreement_decisive", "top-1 (decisive)"), ("top5_overlap", "top-5"),
           ("kl_mean", "KL mean"), ("kl_max", "KL max"), ("cosine_min", "cos min"),
           ("fp32ref_hf_bf16_kl_mean", "KL fp32→HF-bf16"), ("fp32ref_megatron_bf16_kl_mean", "KL fp32→Meg-bf16"),
           ("ok", "pass")]
COLUMNS_FP64 = [("case", "case"), ("params", "params"), ("dtype", "dtype"), ("tp", "TP"), ("pp", "PP"),
                ("chunked_tp", "saved at TP"), ("positions", "positions"),
                ("hf_fp64_max_rel_diff", "HF-X rel"), ("megatron_fp64_max_rel_diff", "Meg-X rel"),
                ("bound_max_rel_diff", "bound"), ("hf_fp64_kl_mean", "HF-X KL"),
                ("megatron_fp64_kl_mean", "Meg-X KL"), ("bound_mean_kl", "KL bound"),
                ("megatron_fp64_top1_decisive", "top-1 (decisive)"), ("direct_max_rel_diff", "HF-X vs Meg-X"),
                ("max_layer_ratio", "worst layer ratio"), ("ok", "pass")]


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
    records = [json.loads(line) for path in paths for line in open(path) if line.strip()]
    records = [r for r in records if "error" not in r]
    columns = COLUMNS_FP64 if any("hf_fp64_max_rel_diff" in r for r in records) else COLUMNS
    print("| " + " | ".join(h for _, h in columns) + " |")
    print("|" + "---|" * len(columns))
    for r in records:
        print("| " + " | ".join(cell(k, r.get(k)) for k, _ in columns) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
