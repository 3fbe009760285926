"""Distil a causal language model with fastkd, next to the same run with the eager PyTorch loss.

    python examples/distill_causal_lm.py            # 100 + 2 x 200 steps: minutes on a CPU
    python examples/distill_causal_lm.py --smoke    # seconds (what CI runs)

Nothing is downloaded. The corpus is the Python standard library's own source files, tokenised
with a byte-level BPE trained here with the ``tokenizers`` package; the teacher and the smaller
student are Llama models built from ``transformers`` configs (random initialisation, vocabulary
of 32000), and the teacher is first pre-trained briefly so that its targets mean something.

The student is then distilled twice from the same initialisation on the same batches:
  fastkd   ``fastkd.fused_linear_kd_loss`` on the final hidden states and the LM heads
           (neither model's [tokens, V] logits are built);
  eager    full logits from both models and the textbook PyTorch loss
           (``F.kl_div`` of log-softmaxes at temperature T, times T**2, plus cross-entropy).
Both minimise  hard_weight * CE + soft_weight * T**2 * KL(teacher || student)  per token. The
script prints both loss curves' largest difference (they must coincide), the wall time and the
peak memory of each run, and plots the curves to ``<out>/distill_causal_lm.png`` when matplotlib
is installed (``--out``, default ``examples/output/``, git-ignored). Needs the ``hf`` extra
(transformers, tokenizers): ``pip install -e ".[hf]"`` in the checkout.
"""
import argparse
import copy
import ctypes
import glob
import json
import os
import re
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F

import fastkd

FULL = dict(corpus_mb=8.0, vocab=32000, teacher_hidden=128, teacher_layers=2, student_hidden=64,
            student_layers=2, seq=32, batch=4, steps=200, pretrain_steps=100)
# Beside this script, git-ignored: the results never land in the working tree unasked.
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
SMOKE = dict(corpus_mb=0.3, vocab=8192, teacher_hidden=32, teacher_layers=1, student_hidden=16,
             student_layers=1, seq=32, batch=2, steps=5, pretrain_steps=2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few steps (CI)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="folder for the PNG and the JSON results (default: examples/output/, git-ignored)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--hard-weight", type=float, default=0.5)
    parser.add_argument("--soft-weight", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    for name, value in FULL.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=None,
                            help=f"default {value} ({SMOKE[name]} with --smoke)")
    args = parser.parse_args(argv)
    for name, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# ---------------------------------------------------------------------------------------------
# Data: the standard library's sources, a byte-level BPE, random windows of tokens


def stdlib_sources(max_bytes):
    """Source texts of the standard library (top-level modules first), about ``max_bytes`` in all."""
    root = sysconfig.get_paths()["stdlib"]
    nested = glob.glob(os.path.join(root, "*", "**", "*.py"), recursive=True)
    files = sorted(glob.glob(os.path.join(root, "*.py"))) + sorted(
        f for f in nested if "site-packages" not in f and os.sep + "test" not in f)
    texts, size = [], 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
        size += len(texts[-1])
        if size >= max_bytes:
            break
    return texts


def train_tokenizer(texts, vocab_size):
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    return tokenizer


def token_stream(tokenizer, texts, n_tokens):
    """The first ``n_tokens`` tokens of the texts, joined by end-of-text."""
    eot = tokenizer.token_to_id("<|endoftext|>")
    ids = []
    for text in texts:
        ids += tokenizer.encode(text).ids + [eot]
        if len(ids) >= n_tokens:
            break
    return torch.tensor(ids, dtype=torch.long)


def random_batches(stream, batch, seq, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq, (steps, batch), generator=generator)
    return [torch.stack([stream[s:s + seq] for s in row.tolist()]) for row in starts]


# ---------------------------------------------------------------------------------------------
# Models and the two losses


def make_llama(vocab, hidden, layers, seed):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                                      max_position_embeddings=1024, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def fastkd_loss(student, teacher, ids, args):
    """Fused: hidden states and LM-head weights in, no [tokens, V] logits anywhere."""
    h = student.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    with torch.no_grad():
        h_t = teacher.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    return fastkd.fused_linear_kd_loss(h, student.lm_head.weight, h_t, teacher.lm_head.weight,
                                       labels=ids[:, 1:], temperature=args.temperature,
                                       hard_weight=args.hard_weight, soft_weight=args.soft_weight)


def eager_loss(student, teacher, ids, args):
    """The textbook PyTorch loss on full logits."""
    T = args.temperature
    s = student(input_ids=ids, use_cache=False).logits[:, :-1].flatten(0, 1)
    with torch.no_grad():
        t = teacher(input_ids=ids, use_cache=False).logits[:, :-1].flatten(0, 1)
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True)
    ce = F.cross_entropy(s, ids[:, 1:].flatten())
    return args.hard_weight * ce + args.soft_weight * T * T * kl


# ---------------------------------------------------------------------------------------------
# Memory and progress


def _fixed_mmap_threshold():
    """Big CPU buffers straight from mmap, so freed ones leave the resident set (honest peaks)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory between ``start()`` and ``stop()``: the CUDA allocator's peak, or the resident
    set's high-water mark on Linux; ``added`` is the peak above the memory in use at ``start()``."""

    def __init__(self, device):
        self.device = device
        self.base = self.peak = self.added = None

    def _cpu_hwm(self):
        try:
            with open("/proc/self/status") as f:
                return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) * 1024
        except (OSError, AttributeError):
            return None

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current resident set
            except OSError:
                pass
            self.base = self._cpu_hwm()

    def stop(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = self._cpu_hwm()
        self.added = None if self.peak is None or self.base is None else self.peak - self.base


def progress(items, desc):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, desc=desc, leave=False, file=sys.stdout, mininterval=1.0)
        return
    for i, item in enumerate(items):
        if i % max(1, len(items) // 10) == 0:
            print(f"  {desc}: step {i}/{len(items)}", flush=True)
        yield item


# ---------------------------------------------------------------------------------------------
# Training


def pretrain(teacher, batches, lr, device):
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=lr)
    teacher.train()
    losses = []
    for ids in progress(batches, "pre-training the teacher"):
        ids = ids.to(device)
        loss = teacher(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    teacher.eval()
    teacher.requires_grad_(False)  # a constant from now on
    return losses


def distil(loss_fn, student, teacher, batches, args, device, desc):
    student = copy.deepcopy(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
    memory = PeakMemory(device)
    losses = []
    start = time.perf_counter()
    for step, ids in enumerate(progress(batches, desc)):
        if step == 1:  # from the second step on: the optimiser state exists and counts as baseline
            memory.start()
        loss = loss_fn(student, teacher, ids.to(device), args)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    memory.stop()
    return dict(losses=losses, seconds=time.perf_counter() - start, peak_bytes=memory.peak,
                added_bytes=memory.added)


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fastkd_losses, eager_losses = results["fastkd"]["losses"], results["eager"]["losses"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw=dict(height_ratios=[3, 1]))
    top.plot(eager_losses, label="eager PyTorch loss (full logits)", linewidth=3, alpha=0.5)
    top.plot(fastkd_losses, label="fastkd.fused_linear_kd_loss", linewidth=1, linestyle="--")
    top.set_ylabel("distillation loss")
    top.legend()
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.0f} MiB"  # noqa: E731
    top.set_title(f"peak memory added by training: fastkd {mib(results['fastkd']['added_bytes'])}, "
                  f"eager {mib(results['eager']['added_bytes'])}", fontsize=9)
    bottom.plot([abs(a - b) for a, b in zip(fastkd_losses, eager_losses)], color="gray")
    bottom.set_ylabel("|difference|")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cpu":
        _fixed_mmap_threshold()
    os.makedirs(args.out, exist_ok=True)

    start = time.perf_counter()
    texts = stdlib_sources(int(args.corpus_mb * 1e6))
    tokenizer = train_tokenizer(texts, args.vocab)
    n_tokens = (args.steps + args.pretrain_steps) * args.batch * args.seq + 10 * args.seq
    stream = token_stream(tokenizer, texts, n_tokens)
    print(f"corpus: {len(texts)} standard-library files, {sum(map(len, texts)) / 1e6:.1f} MB; BPE vocabulary "
          f"{tokenizer.get_vocab_size()} (model vocabulary {args.vocab}); {len(stream)} tokens "
          f"[{time.perf_counter() - start:.1f} s]")

    teacher = make_llama(args.vocab, args.teacher_hidden, args.teacher_layers, seed=args.seed + 1).to(device)
    student = make_llama(args.vocab, args.student_hidden, args.student_layers, seed=args.seed + 2).to(device)
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    print(f"teacher {count(teacher):.1f}M parameters, student {count(student):.1f}M; "
          f"{args.batch} x {args.seq} tokens per step, {args.steps} steps, device {device}")

    pretrain_losses = pretrain(teacher, random_batches(stream, args.batch, args.seq, args.pretrain_steps,
                                                       args.seed + 3), 3 * args.lr, device)
    if pretrain_losses:
        print(f"teacher pre-trained {len(pretrain_losses)} steps: loss {pretrain_losses[0]:.2f} -> "
              f"{pretrain_losses[-1]:.2f}")

    batches = random_batches(stream, args.batch, args.seq, args.steps, args.seed + 4)
    results = {"fastkd": distil(fastkd_loss, student, teacher, batches, args, device, "distilling (fastkd)"),
               "eager": distil(eager_loss, student, teacher, batches, args, device, "distilling (eager)")}
    fastkd_losses, eager_losses = results["fastkd"]["losses"], results["eager"]["losses"]
    max_diff = max(abs(a - b) for a, b in zip(fastkd_losses, eager_losses))
    results["max_abs_difference"] = max_diff
    results["max_rel_difference"] = max(abs(a - b) / abs(b) for a, b in zip(fastkd_losses, eager_losses))
    results["config"] = {k: v for k, v in vars(args).items()}

    print(f"distillation loss {eager_losses[0]:.4f} -> {eager_losses[-1]:.4f} (eager), "
          f"{fastkd_losses[0]:.4f} -> {fastkd_losses[-1]:.4f} (fastkd); largest difference "
          f"{max_diff:.2e} ({results['max_rel_difference']:.1e} relative)")
    for name in ("fastkd", "eager"):
        r = results[name]
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f} MiB"
        added = "n/a" if r["added_bytes"] is None else f"{r['added_bytes'] / 2**20:.0f} MiB"
        print(f"  {name:6s} {r['seconds']:6.1f} s, peak memory {peak} ({added} above the models, data "
              "and optimiser state)")
    results["plot"] = plot(results, os.path.join(args.out, "distill_causal_lm.png"))
    if results["plot"]:
        print(f"plot: {results['plot']}")
    results["total_seconds"] = time.perf_counter() - start
    print(f"total {results['total_seconds']:.0f} s")
    with open(os.path.join(args.out, "distill_causal_lm.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
