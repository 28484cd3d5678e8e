"""One rank of the distributed-equals-single-process test (run by test_distributed.py):
trains a few steps on its shard of fixed batches with a gloo process group and writes every
step's preconditioned gradients to OUT.rank.npz. With WORLD_SIZE=1 and no process group it is the
single-process reference on the concatenated batches."""
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tengrad.torch as tt  # noqa: E402
from test_torch import batch, cnn, mlp  # noqa: E402


def main():
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    make, fisher, m, out, distributed = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
    group = None
    if distributed:
        dist.init_process_group("gloo", rank=rank, world_size=size, timeout=__import__("datetime").timedelta(seconds=60))
        group = dist.group.WORLD
    torch.manual_seed(0)
    model = {"mlp": mlp, "cnn": cnn}[make]()
    kl = fisher.endswith("+kl")                             # KL clipping that is active (ν < 1)
    fisher = fisher.removesuffix("+kl")
    pre = tt.TENGraD(model, damping=0.1, fisher=fisher, update_freq=2, process_group=group,
                     kl_clip=1e-4 if kl else None, lr=1.0 if kl else None)
    shards = np.array_split(np.arange(m), size) if distributed else [np.arange(m)]
    mine = shards[rank]
    saved = {}
    for step in range(4):                                   # refresh, reuse, refresh, reuse
        x, y = batch(model, m, 100 + step)
        x, y = x[mine], y[mine]
        model.zero_grad()
        logits = model(x)
        if fisher == "sampled":
            # the same sampled labels as the single process: draw for the whole batch, take mine
            g = torch.Generator().manual_seed(7 + step)
            full_x, _ = batch(model, m, 100 + step)
            with torch.no_grad():
                labels = torch.multinomial(torch.softmax(model(full_x), -1), 1, generator=g).squeeze(-1)[mine]
            if pre.steps % pre.update_freq == 0:
                pre._sampling = True
                try:
                    torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"),
                                        [p for p in model.parameters()], retain_graph=True)
                finally:
                    pre._sampling = False
        F.cross_entropy(logits, y).backward()
        pre.step()
        for name, p in model.named_parameters():
            saved[f"{step}/{name}"] = p.grad.numpy().copy()
        with torch.no_grad():                               # a fixed, rank-independent move
            for p in model.parameters():
                p.sub_(0.05 * p.grad)
    np.savez(f"{out}.{rank}.npz", owners=np.array(pre._owners or []), nu=np.array(pre.last_nu), **saved)
    if distributed:
        # Every rank has finished every collective once the barrier returns; leave without
        # gloo's teardown, which aborted now and then when a peer's connection closed first.
        dist.barrier()
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
