"""Data-parallel training of the demo (``fashion_mnist.py --distributed``, started by torchrun):

    torchrun --standalone --nproc_per_node=2 examples/torch/fashion_mnist.py --distributed \
        [--optimizers tengrad,sgd,adam] [--budget 60] [--batch 128] [--graft adam] [--tengrad-base adam] [--window 2]

Every process holds the whole data set, shuffles it alike and trains on its share of each global
batch of ``--batch`` samples; the model is wrapped in ``DistributedDataParallel`` (gloo). TENGraD
gets the process group: each layer's exact Fisher block is the block of the global batch
(docs/DESIGN.md §11), its ``ddp_comm_hook`` leaves DDP nothing to average for the preconditioned
layers, and ``step()`` reduces, preconditions and broadcasts instead. SGD and Adam use DDP's
allreduce. ASDL's KFAC has no data-parallel mode and is left out.

All processes stop at the same step (the slowest rank's clock decides, one tiny allreduce per
step); test accuracy is evaluated on shards of the test set and summed. Rank 0 prints a table of
steps, seconds per step and accuracy. On this 2-core machine 2 processes show the overhead of
data parallelism, not a speed-up: each process gets one core.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel


def _shard(n, rank, size):
    """This rank's contiguous part of n items (sizes differ by at most one)."""
    return n * rank // size, n * (rank + 1) // size


@torch.no_grad()
def _evaluate(model, x, y, rank, size, batch=1000):
    lo, hi = _shard(len(x), rank, size)
    model.eval()
    correct = torch.zeros(1, dtype=torch.float64)
    for s in range(lo, hi, batch):
        e = min(s + batch, hi)
        correct += (model(x[s:e]).argmax(1) == y[s:e]).sum().item()
    model.train()
    dist.all_reduce(correct)
    return float(correct.item()) / len(x)


def _train(name, args, data, seed, make_model, tt):
    x_train, y_train, x_test, y_test = data
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)                                  # the same initial weights on every rank
    model = make_model(args.width)
    ddp = DistributedDataParallel(model)
    precond = None
    if name == "tengrad":
        graft = None if args.graft == "none" else args.graft
        opt = torch.optim.SGD(ddp.parameters(), lr=args.lr_tengrad, momentum=0.9, weight_decay=5e-4,
                              dampening=0.9 if graft == "adam" else 0.0)
        precond = tt.TENGraD(ddp, damping=args.damping, fisher=args.fisher, update_freq=args.update_freq,
                             kl_clip=args.kl_clip or None, lr=args.lr_tengrad, process_group=dist.group.WORLD,
                             blas_threads=1 if size > 1 else "auto", graft=graft, damping_mode=args.damping_mode,
                             base=None if args.tengrad_base == "none" else args.tengrad_base, window=args.window)
    elif name == "sgd":
        opt = torch.optim.SGD(ddp.parameters(), lr=args.lr_sgd, momentum=0.9, weight_decay=5e-4)
    elif name == "adam":
        opt = torch.optim.Adam(ddp.parameters(), lr=args.lr_adam, weight_decay=5e-4)
    else:
        raise ValueError(f"{name!r} has no data-parallel mode here (tengrad, sgd, adam)")
    order_gen = torch.Generator().manual_seed(seed)           # the same shuffles on every rank
    label_gen = torch.Generator().manual_seed(1000 * seed + rank)  # sampled labels: each rank its own
    lo, hi = _shard(args.batch, rank, size)
    history = {"seconds": [0.0], "accuracy": [_evaluate(model, x_test, y_test, rank, size)]}
    clock, steps, losses, next_eval, done = 0.0, 0, [], args.eval_seconds, False
    while not done:
        order = torch.randperm(len(x_train), generator=order_gen)
        for s in range(0, len(order) - args.batch + 1, args.batch):
            idx = order[s + lo:s + hi]
            xb, yb = x_train[idx], y_train[idx]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            logits = ddp(xb)
            loss = F.cross_entropy(logits, yb)
            if precond is not None and args.fisher == "sampled":
                precond.sample_fisher(logits, generator=label_gen)
            loss.backward()
            if precond is not None:
                precond.step()
            opt.step()
            # Stop together: the largest clock of all ranks decides (and carries the mean loss).
            state = torch.tensor([clock + time.perf_counter() - t0, loss.item() / size], dtype=torch.float64)
            dist.all_reduce(state[1:])
            dist.all_reduce(state[:1], op=dist.ReduceOp.MAX)
            clock = float(state[0])
            steps += 1
            losses.append(float(state[1]))
            done = (args.epochs is not None and steps >= args.epochs * (len(x_train) // args.batch)) or \
                (args.epochs is None and clock >= args.budget)
            if clock >= next_eval or done:
                history["seconds"].append(clock)
                history["accuracy"].append(_evaluate(model, x_test, y_test, rank, size))
                next_eval = clock + args.eval_seconds
                if rank == 0:
                    print(f"  {name:>7}  {clock:6.1f} s  step {steps:5d}  loss {np.mean(losses[-50:]):.3f}  "
                          f"test accuracy {100 * history['accuracy'][-1]:.2f}%", flush=True)
            if done:
                break
    history["steps"] = steps
    history["seconds_per_step"] = clock / steps
    history["final_loss"] = float(np.mean(losses[-20:]))
    if precond is not None:
        precond.remove()
    return history


def main(args, data, make_model, tt):
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    # One core per process when the processes share the machine's cores.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    asked = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    names = [n for n in asked if n in ("tengrad", "sgd", "adam")]
    if rank == 0 and len(names) < len(asked):
        print(f"data parallel runs tengrad, sgd and adam; left out: {', '.join(n for n in asked if n not in names)}")
    if rank == 0:
        print(f"data parallel: {size} process(es), gloo; global batch {args.batch} "
              f"({args.batch // size}–{-(-args.batch // size)} per process), "
              f"{'%d epochs' % args.epochs if args.epochs else '%.0f s of training' % args.budget} per optimizer; "
              f"torch {torch.get_num_threads()} thread(s) per process", flush=True)
    results = {n: _train(n, args, data, args.seed, make_model, tt) for n in names}
    if rank == 0:
        print(f"\n{size} process(es), global batch {args.batch}")
        print(f"{'optimizer':10}{'steps':>8}{'s/step':>10}{'final loss':>12}{'test accuracy':>15}")
        for n, h in results.items():
            print(f"{n:10}{h['steps']:8d}{h['seconds_per_step']:10.4f}{h['final_loss']:12.3f}"
                  f"{100 * h['accuracy'][-1]:14.2f}%")
    dist.barrier()
    dist.destroy_process_group()
