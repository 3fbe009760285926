"""Which dense kernels run on this machine, and whether each matches the two-pass kernel (GPU check).

For each ``fastkd.config.kd_kernel`` value and each V it prints the kernel the launcher picks, or why it
refuses ("unavailable": the resident kernel holds rows of up to 8192 columns; not a failure),
then compares the loss and gradient of every available kernel with the two-pass kernel's on the
same bf16 inputs, for every divergence (with labels and the hard CE). Exit status 1 when one
differs by more than the bench's tolerance, else 0.

    python bench/kernel_check.py [--n 64] [--v 8192,32000,128256]
"""
import argparse
import os
import sys

import torch

if not torch.cuda.is_available():  # a dry run: the kernels through the interpreter, on tiny shapes
    os.environ.setdefault("TRITON_INTERPRET", "1")

LOSS_RTOL = 1e-4   # the bench's check (fastkd.bench.runner.compare)
GRAD_ATOL = 2**-6  # bf16: relative to the gradient's largest magnitude


def loss_and_grad(kernel, s, t, labels, divergence):
    import fastkd

    with fastkd.config.override(kd_kernel=kernel):
        x = s.detach().clone().requires_grad_()
        loss = fastkd.kd_loss(x, t, divergence=divergence, temperature=2.0, labels=labels, hard_weight=0.5,
                              backend="triton")
        loss.backward()
    return loss.detach().float(), x.grad.float()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--v", default="8192,32000,128256")
    args = parser.parse_args(argv)
    import triton

    from fastkd import config
    from fastkd.backends import triton as launch
    from fastkd.divergences import DIVERGENCES

    if torch.cuda.is_available():
        device = torch.device("cuda")
        where = (f"{torch.cuda.get_device_name()} (compute capability "
                 f"{'.'.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        device, where = torch.device("cpu"), "the CPU through the Triton interpreter (no GPU)"
    print(f"triton {triton.__version__}, torch {torch.__version__}, on {where}")
    failed = False
    for V in (int(v) for v in args.v.split(",")):
        available = {}
        for kernel in (k for k in config.KD_KERNELS if k != "auto"):
            try:
                available[kernel] = launch.kd_kernel(V, torch.float32, name=kernel)
            except NotImplementedError as refused:
                print(f"V={V} {kernel}: unavailable: {refused}")
        print(f"V={V} auto runs {launch.kd_kernel(V, torch.float32, name='auto')}; "
              + ", ".join(f"{k} runs {v}" for k, v in available.items()))
        g = torch.Generator(device=device).manual_seed(V)
        s = (2 * torch.randn(args.n, V, device=device, generator=g)).bfloat16()
        t = (2 * torch.randn(args.n, V, device=device, generator=g)).bfloat16()
        labels = torch.randint(0, V, (args.n,), device=device, generator=g)
        labels[::7] = -100
        for divergence in DIVERGENCES:
            ref_loss, ref_grad = loss_and_grad("two_pass", s, t, labels, divergence)
            for kernel in (k for k in available if k != "two_pass"):
                if kernel not in available:
                    continue
                loss, grad = loss_and_grad(kernel, s, t, labels, divergence)
                loss_err = float((loss - ref_loss).abs() / ref_loss.abs().clamp_min(1e-30))
                grad_err = float((grad - ref_grad).abs().max() / ref_grad.abs().max().clamp_min(1e-30))
                ok = loss_err <= LOSS_RTOL and grad_err <= GRAD_ATOL
                failed |= not ok
                print(f"V={V} {divergence} {kernel} ({available[kernel]}) vs two_pass: loss rel err {loss_err:.2e}, "
                      f"grad err {grad_err:.2e} of its max: {'ok' if ok else 'MISMATCH'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
