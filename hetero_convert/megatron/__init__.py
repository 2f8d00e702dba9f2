"""megatron-core itself, run by this project: the GPTModel of a plan on GPU (nccl) or CPU (gloo).

    cpu.py       the CPU patches, as a context manager that restores what it replaced
    parallel.py  process groups for a (TP, PP) layout; `session` = patches + groups, undone on exit
    model.py     build the model, load / save torch_dist checkpoints, forward-only logits and layer outputs
    worker.py    the torchrun worker verify launches (launch.run_under_torchrun)

Typical use, one process per rank under torchrun:

    with session(tp, pp, device):
        model = build_model(plan, tp, pp, "fp32", device)
        load_checkpoint(model, ckpt_dir)
        out = forward_logits(model, input_ids, attention_mask, plan=plan, hidden=True)   # rank 0 only
"""
