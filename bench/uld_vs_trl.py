"""fastkd.uld_loss (exact and top-K) against TRL's GOLD ULDLoss on the CPU: time of forward +
backward, the bytes autograd keeps for the backward (saved tensors, by storage), and the top-K
error against exact ULD. Not part of ``fastkd bench`` yet.

    python bench/uld_vs_trl.py --n 64 --v 32000 151936
"""
import argparse
import time
from types import SimpleNamespace

import torch

import fastkd


def saved_bytes(fn):
    """(result of ``fn()``, bytes of the distinct storages autograd saved while it ran)."""
    storages = {}

    def pack(x):
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return out, sum(storages.values())


def timed(fn, student, repeats):
    best = float("inf")
    for _ in range(repeats):
        student.grad = None
        t0 = time.perf_counter()
        fn().backward()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="tokens (2 samples of n / 2)")
    parser.add_argument("--v", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=float, default=3.0, help="standard deviation of the random logits "
                        "(larger: peaked distributions, as a trained model's, and a smaller top-K bound)")
    args = parser.parse_args()
    from trl.experimental.gold.gold_trainer import ULDLoss
    config = SimpleNamespace(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
                             uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                             use_extended_uld=False, uld_token_merge_strategy="observed")
    trl_loss = ULDLoss(config)
    print("V       provider          fwd+bwd s   saved MiB   loss        |err| vs exact  bound")
    for V in args.v:
        torch.manual_seed(0)
        S = args.n // 2
        student = (torch.randn(2, S, V) * args.scale).requires_grad_()
        teacher = torch.randn(2, S, V) * args.scale
        labels = torch.zeros(2, S, dtype=torch.long)
        ids = torch.zeros(2, S, dtype=torch.long)
        runs = {"trl-gold": lambda: trl_loss(student, teacher, labels, labels, ids, ids),
                "fastkd exact": lambda: fastkd.uld_loss(student, teacher, labels=labels),
                f"fastkd k={args.k}": lambda: fastkd.uld_loss(student, teacher, labels=labels, k=args.k)}
        exact = float(fastkd.uld_loss(student.detach(), teacher, labels=labels))
        for name, fn in runs.items():
            seconds = timed(fn, student, args.repeats)
            loss, nbytes = saved_bytes(fn)
            bound = ""
            if "k=" in name:
                bound = f"{float(fastkd.uld_loss(student.detach(), teacher, k=args.k, return_bound=True)[1]):.3g}"
            print(f"{V:<7} {name:<17} {seconds:9.3f} {nbytes / 2**20:11.1f}   {loss.item():.6f}  "
                  f"{abs(loss.item() - exact):.3g}  {bound}")


if __name__ == "__main__":
    main()
