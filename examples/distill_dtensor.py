"""Distil a tiny language model whose LM head is sharded with DTensor, on CPU processes with gloo.

    torchrun --nproc-per-node 2 examples/distill_dtensor.py --mode tp         # seconds
    torchrun --nproc-per-node 2 examples/distill_dtensor.py --mode tp-fused
    torchrun --nproc-per-node 2 examples/distill_dtensor.py --mode fsdp
    torchrun --nproc-per-node 2 examples/distill_dtensor.py --mode tp --teachers 2   # a mixture

The student and the teachers are an embedding, one MLP block and an LM head (random
initialisation, V = 4096). Each step distils the student on one batch of random tokens with
hard_weight * CE + T**2 * KL(teacher || student), the teacher the equal mixture of ``--teachers``
models (default 1), its vocabulary sharded like the student's:

  tp        the LM heads are tensor parallel (``parallelize_module`` with
            ``ColwiseParallel(use_local_output=False)``): their logits are DTensors sharded by
            vocabulary, ``Shard(-1)``, and ``fastkd.kd_loss`` takes them as they are (no gather);
  tp-fused  the same heads, and ``fastkd.fused_linear_kd_loss`` on the final hidden states (a
            replicated DTensor) and the heads' ``Shard(0)`` weights: no rank builds its
            [tokens, V / P] logits either, only [chunk, V / P] at a time;
  fsdp      the models are sharded with FSDP2's ``fully_shard`` (each rank its own batch), and
            ``fastkd.fused_linear_kd_loss`` takes the student head's sharded weight: it is
            gathered once per call and its gradient returns sharded (averaged, as FSDP2 does).

Rank 0 prints the loss at each step and the bytes fastkd all-reduced per step (counted by wrapping
``torch.distributed.all_reduce``; ``--json PATH`` writes them). Each rank checks at the first step
that the loss equals ``fastkd.kd_loss`` on the gathered logits.
"""
import argparse
import json

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import fastkd

VOCAB, HIDDEN, SEQ, BATCH, T, HARD = 4096, 64, 32, 4, 2.0, 0.5


class TinyLM(torch.nn.Module):
    """An embedding, one MLP block; ``forward`` returns the final hidden states, ``lm_head`` the logits."""

    def __init__(self, hidden):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, hidden)
        self.block = torch.nn.Sequential(torch.nn.Linear(hidden, 4 * hidden), torch.nn.GELU(),
                                         torch.nn.Linear(4 * hidden, hidden))
        self.lm_head = torch.nn.Linear(hidden, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        return x + self.block(x)


class AllReduceCounter:
    """Bytes passed to ``torch.distributed.all_reduce`` (fastkd's collectives go through it)."""

    def __init__(self):
        self.bytes, self.calls = 0, 0
        self._all_reduce = dist.all_reduce

        def counted(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            self.calls += 1
            return self._all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counted

    def take(self):
        counts, (self.bytes, self.calls) = (self.bytes, self.calls), (0, 0)
        return counts


def loss_of(mode, student, teachers, tokens, labels):
    """The step's loss and, for the first-step check, the same loss on gathered logits. ``teachers``:
    a list of models (one, or a mixture), passed to fastkd as lists."""
    hidden = student(tokens)
    with torch.no_grad():
        t_hiddens = [teacher(tokens) for teacher in teachers]
    kw = dict(labels=labels, temperature=T, hard_weight=HARD)
    if mode == "tp":
        logits = student.lm_head(hidden)  # a DTensor sharded by vocabulary: Shard(-1)
        with torch.no_grad():
            t_logits = [teacher.lm_head(h) for teacher, h in zip(teachers, t_hiddens)]
        return fastkd.kd_loss(logits, t_logits, **kw), lambda: fastkd.kd_loss(
            logits.full_tensor().detach(), [z.full_tensor() for z in t_logits], **kw)
    t_weights = [teacher.lm_head.weight.detach() for teacher in teachers]
    if mode == "tp-fused":
        mesh = student.lm_head.weight.device_mesh
        h = DTensor.from_local(hidden, mesh, [Replicate()])  # the same hidden states on every rank
        th = [DTensor.from_local(t_hidden, mesh, [Replicate()]) for t_hidden in t_hiddens]
        loss = fastkd.fused_linear_kd_loss(h, student.lm_head.weight, th, t_weights, **kw)
    else:  # fsdp: this rank's rows, the heads sharded by FSDP2
        loss = fastkd.fused_linear_kd_loss(hidden, student.lm_head.weight, t_hiddens, t_weights, **kw)
    weight = student.lm_head.weight.full_tensor().detach()
    return loss, lambda: fastkd.kd_loss(hidden.detach() @ weight.T,
                                        [h @ w.full_tensor().T for h, w in zip(t_hiddens, t_weights)], **kw)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("tp", "tp-fused", "fsdp"), default="tp")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--teachers", type=int, default=1, help="how many teachers the mixture has")
    parser.add_argument("--json", help="write rank 0's losses and bytes per step here")
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)  # the same models on every rank
    student, teachers = TinyLM(HIDDEN), [TinyLM(2 * HIDDEN) for _ in range(args.teachers)]
    if args.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for model in (student, *teachers):
            fully_shard(model.lm_head, mesh=mesh)
            fully_shard(model, mesh=mesh)
    else:
        for model in (student, *teachers):
            parallelize_module(model, mesh, {"lm_head": ColwiseParallel(use_local_output=False)})
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    counter = AllReduceCounter()

    # Tensor parallel: every rank sees the same batch; FSDP: each rank its own.
    data = torch.Generator().manual_seed(1 + (rank if args.mode == "fsdp" else 0))
    history = []
    for step in range(args.steps):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=data)
        loss, reference = loss_of(args.mode, student, teachers, tokens[:, :-1], tokens[:, 1:])
        loss_bytes, loss_calls = counter.take()
        loss.backward()
        backward_bytes, backward_calls = counter.take()
        optimizer.step()
        optimizer.zero_grad()
        value = (loss.full_tensor() if isinstance(loss, DTensor) else loss).detach()
        if step == 0:
            torch.testing.assert_close(value, reference(), rtol=1e-5, atol=1e-6)
        history.append(dict(step=step, loss=float(value), forward_all_reduce_bytes=loss_bytes,
                            forward_all_reduces=loss_calls, backward_all_reduce_bytes=backward_bytes))
        if rank == 0:
            print(f"{args.mode} step {step}: loss {float(value):.4f}; fastkd all-reduced {loss_bytes} B in "
                  f"{loss_calls} calls (forward), {backward_bytes} B in {backward_calls} (backward)", flush=True)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(dict(mode=args.mode, world_size=world, tokens=BATCH * SEQ, vocab=VOCAB, teachers=args.teachers,
                           history=history), f)
    dist.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
