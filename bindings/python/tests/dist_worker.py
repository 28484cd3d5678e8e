"""One rank of the distributed-equals-single-process test (run by test_distributed.py):
trains a few steps on its shard of fixed batches with a gloo process group and writes every
step's preconditioned gradients to OUT.rank.npz. With WORLD_SIZE=1 and no process group it is the
single-process reference on the concatenated batches.

VARIANT "mask": forwards under pre.token_mask (padded sequences). VARIANT "ddp": the model is wrapped in DistributedDataParallel (TENGraD registers its comm hook)
and the first layer is skipped, so DDP averages it while TENGraD handles the others; the reference
skips the same layer. VARIANT "inject": rank 1 makes steps fail (a NaN gradient seen by the owner,
a NaN activation seen by the owner's curvature update, a missing gradient seen locally); every rank
must raise with every .grad unchanged, and the retry after the cause is removed must equal a clean
run. VARIANT "accumulate": reuse steps run two micro-batches of unequal sizes per rank.
"""
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tengrad.torch as tt  # noqa: E402
from test_torch import batch as plain_batch, cnn, mlp  # noqa: E402


class MeanTokens(torch.nn.Module):
    def forward(self, x):
        return x.mean(1)


def seq():
    """A linear layer over 5 tokens, pooled, then a head: sequence rows in the distributed step."""
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), MeanTokens(), torch.nn.Linear(6, 3))


class Attention(torch.nn.Module):
    """Standard transformer modules: an nn.MultiheadAttention (two blocks), an nn.LayerNorm over
    tokens, pooled, then a head."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(4, 6)
        self.attn = torch.nn.MultiheadAttention(6, 2, batch_first=True)
        self.norm = torch.nn.LayerNorm(6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.norm(h + self.attn(h, h, h, need_weights=False)[0]).mean(1))


class Tokens(torch.nn.Module):
    """Token ids through an nn.Embedding with a padding id (its raw rows travel: ids and output
    gradients) plus position embeddings from ids expanded per sequence (per-sample rows: a small
    table), pooled, then a head."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(9, 6, padding_idx=0)
        self.pos = torch.nn.Embedding(5, 6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, ids):
        h = self.embed(ids) + self.pos(torch.arange(ids.shape[1]).expand(ids.shape))
        return self.head(torch.tanh(h).mean(1))


def batch(model, m, seed):
    if isinstance(model, Tokens):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 9, (m, 5), generator=g), torch.randint(0, 3, (m,), generator=g)
    if isinstance(model, Partial):
        model = model.body
    if isinstance(model, Attention) or isinstance(model[2], MeanTokens):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(m, 5, 4, generator=g), torch.randint(0, 3, (m,), generator=g)
    return plain_batch(model, m, seed)


def token_mask(m, seed):
    """Padding: sequence i keeps its first 5 - (i + seed) % 3 tokens."""
    mask = torch.ones(m, 5, dtype=torch.bool)
    for i in range(m):
        mask[i, 5 - (i + seed) % 3:] = False
    return mask


def must_fail(pre, model, what):
    before = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    try:
        pre.step()
    except RuntimeError as e:
        print(f"raised as expected ({what}): {e}", file=sys.stderr)
    else:
        raise AssertionError(f"step() did not raise: {what}")
    for p, g in zip(model.parameters(), before):
        assert (p.grad is None) == (g is None) and (g is None or torch.equal(torch.nan_to_num(p.grad, 7.0),
                                                                             torch.nan_to_num(g, 7.0))), what


def inject_failures(pre, model, rank, step):
    """Rank 1 breaks the step; every rank (the others see only the collective verdict) must raise
    and keep every .grad; then the cause is removed and the caller's step() must equal a clean one."""
    layer = pre._layers[pre._owners.index(0)]               # a layer rank 0 owns, so rank 1's fault is remote
    weight = layer.module.weight
    if step == 1:                                           # reuse step: a NaN gradient reaches the owner
        saved = weight.grad[0].clone() if rank == 1 else None
        if rank == 1:
            weight.grad[0, 0] = float("nan")
        must_fail(pre, model, "NaN gradient at the owner")
        if rank == 1:
            weight.grad[0].copy_(saved)
        return
    # refresh step: a NaN activation reaches the owner's curvature update, then a missing gradient
    inputs = layer.captures[-1].inputs if rank == 1 else None
    saved = inputs.reshape(-1)[0].clone() if rank == 1 else None
    if rank == 1:
        inputs.reshape(-1)[0] = float("nan")
    must_fail(pre, model, "NaN activation at the owner")
    if rank == 1:
        inputs.reshape(-1)[0] = saved
        held, weight.grad = weight.grad, None
    must_fail(pre, model, "a rank without a gradient")
    if rank == 1:
        weight.grad = held


class Partial(torch.nn.Module):
    """The MLP with its first layer frozen, a head it never uses, and a keyword-only input."""

    def __init__(self):
        super().__init__()
        self.body = mlp()
        self.unused = torch.nn.Linear(4, 4)
        for p in self.body[0].parameters():
            p.requires_grad_(False)

    def forward(self, *, x):
        return self.body(x)


def one_step_more(rank, size, m, out):
    """The end of training: rank 0 calls step() once more after the others destroyed the process
    group and left; its step must raise within seconds (gloo reports the closed connection), not
    wait for the group's timeout (60 s here)."""
    torch.manual_seed(0)
    model = mlp()
    pre = tt.TENGraD(model, damping=0.1, update_freq=2, process_group=dist.group.WORLD)
    mine = np.array_split(np.arange(m), size)[rank]
    for step in range(3 if rank else 4):
        if step == 3:
            time.sleep(1.0)                                 # the others are gone by now
        x, y = batch(model, m, 400 + step)
        model.zero_grad()
        F.cross_entropy(model(x[mine]), y[mine]).backward()
        start = time.monotonic()
        try:
            pre.step()
        except RuntimeError as e:
            with open(f"{out}.{rank}.txt", "w") as f:
                f.write(f"{time.monotonic() - start:.3f} {type(e).__name__}: {e}".replace("\n", " "))
            os._exit(0)
    if rank:
        dist.destroy_process_group()
    with open(f"{out}.{rank}.txt", "w") as f:
        f.write("returned")
    os._exit(0)


def disagreements(rank, size, m, out):
    """Ranks that disagree raise on every rank with nothing changed, within seconds: a damping set
    on one rank only; then a rank that skipped step() (it ran two training forwards)."""
    group = dist.group.WORLD
    torch.manual_seed(0)
    model = mlp()
    pre = tt.TENGraD(model, damping=0.1, update_freq=2, process_group=group)
    mine = np.array_split(np.arange(m), size)[rank]
    said = []

    def forward_backward(seed):
        x, y = batch(model, m, seed)
        F.cross_entropy(model(x[mine]), y[mine]).backward()

    forward_backward(300)
    if rank == 1:
        pre.set_damping(0.2)
    before = [p.grad.clone() for p in model.parameters()]
    try:
        pre.step()
    except RuntimeError as e:
        said.append(str(e))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))
    pre.set_damping(0.1)
    pre.step()                                              # agreed now: the step goes through
    model.zero_grad()
    forward_backward(301)
    if rank == 1:                                           # rank 1 skips this step(): its next one pairs
        forward_backward(302)                               # with the others' step() of batch 301
    try:
        pre.step()
    except RuntimeError as e:
        said.append(str(e))
    with open(f"{out}.{rank}.txt", "w") as f:
        f.write("\n".join(said))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


def resume(rank, size, m, out):
    """The usual checkpoint habit data-parallel: rank 0 saves, every rank loads that; the next
    step (a reuse step by the schedule) refreshes instead of failing on owners without a snapshot."""
    group = dist.group.WORLD
    torch.manual_seed(0)
    model = mlp()
    pre = tt.TENGraD(model, damping=0.1, update_freq=4, process_group=group)
    mine = np.array_split(np.arange(m), size)[rank]
    saved = {}

    def one_step(seed):
        x, y = batch(model, m, seed)
        model.zero_grad()
        F.cross_entropy(model(x[mine]), y[mine]).backward()
        pre.step()
        for name, p in model.named_parameters():
            saved[f"{seed}/{name}"] = p.grad.numpy().copy()
    one_step(400)                                           # refresh
    one_step(401)                                           # reuse
    path = f"{out}.state"
    if rank == 0:
        torch.save(pre.state_dict(), path)
    dist.barrier()
    pre.load_state_dict(torch.load(path, weights_only=False))
    one_step(402)                                           # by the schedule a reuse step: refreshes
    one_step(403)                                           # reuse of that refresh
    np.savez(f"{out}.{rank}.npz", steps=np.array(pre.steps), **saved)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


def ddp_remove(rank, size, make, m, out):
    """A DDP model's TENGraD removed, then plain DDP steps, then a new TENGraD on the same model:
    DDP must average every gradient again after remove() (the hook used to skip the preconditioned
    layers forever), and the new TENGraD must take the hook over (DDP refuses a second hook)."""
    group = dist.group.WORLD
    torch.manual_seed(0)
    model = {"mlp": mlp, "cnn": cnn}[make]()
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=group)
    mine = np.array_split(np.arange(m), size)[rank]
    saved = {}

    def one_step(tag, pre):
        x, y = batch(model, m, 200 + len(saved))
        model.zero_grad()
        F.cross_entropy(ddp(x[mine]), y[mine]).backward()
        if pre is not None:
            pre.step()
        for name, p in model.named_parameters():
            saved[f"{tag}/{name}"] = p.grad.numpy().copy()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.05 * p.grad)
    pre = tt.TENGraD(ddp, damping=0.1, process_group=group)
    one_step("first", pre)
    pre.remove()
    one_step("plain", None)
    second = tt.TENGraD(ddp, damping=0.1, process_group=group)
    one_step("second", second)
    np.savez(f"{out}.{rank}.npz", **saved)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


# Variants that are options of TENGraD (the single-process reference takes them too).
OPTIONS = {"graft-sgd": {"graft": "sgd"}, "graft-adam": {"graft": "adam"}, "base": {"base": "adam"},
           "window": {"window": 2}, "window-base": {"window": 3, "base": "adam"}}


def main():
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    make, fisher, m, out, distributed = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
    variant = sys.argv[6] if len(sys.argv) > 6 else "plain"
    group = None
    if distributed:
        dist.init_process_group("gloo", rank=rank, world_size=size, timeout=__import__("datetime").timedelta(seconds=60))
        group = dist.group.WORLD
        if variant == "ddp-remove":
            return ddp_remove(rank, size, make, m, out)
        if variant == "resume":
            return resume(rank, size, m, out)
        if variant == "disagree":
            return disagreements(rank, size, m, out)
        if variant == "one-step-more":
            return one_step_more(rank, size, m, out)
        if variant == "subgroup":                           # TENGraD on global ranks 1..P-1 only
            group = dist.new_group(list(range(1, size)))
            if rank == 0:
                dist.barrier()
                os._exit(0)
            rank, size = rank - 1, size - 1
    torch.manual_seed(0)
    model = {"mlp": mlp, "cnn": cnn, "seq": seq, "attn": Attention, "tokens": Tokens}[make]() if variant != "partial" else Partial()
    kl = fisher.endswith("+kl")                             # KL clipping that is active (ν < 1)
    fisher = fisher.removesuffix("+kl")
    skip, hooked = [], model
    if variant == "ddp":
        skip = ["0"]
        if distributed:
            hooked = torch.nn.parallel.DistributedDataParallel(model, process_group=group)
            skip = ["module.0"]
    pre = tt.TENGraD(hooked, damping=0.1, fisher=fisher, update_freq=2, process_group=group, skip=skip,
                     kl_clip=1e-4 if kl else None, lr=1.0 if kl else None, **OPTIONS.get(variant, {}))
    shards = np.array_split(np.arange(m), size) if distributed else [np.arange(m)]
    if variant == "empty" and distributed:                  # the last rank gets no sample at all
        shards = np.array_split(np.arange(m), size - 1) + [np.arange(0)]
    mine = shards[rank]
    saved = {}
    for step in range(6 if variant.startswith("window") else 4):  # refresh, reuse, ... (a window: 3 refreshes)
        x, y = batch(model, m, 100 + step)
        x, y = x[mine], y[mine]
        model.zero_grad()
        if variant == "mask":
            with pre.token_mask(token_mask(m, step)[mine]):
                logits = hooked(x)
        elif variant == "partial":
            logits = hooked(x=x)
        elif variant == "accumulate" and distributed and step % 2 == 1 and len(x) > 1:
            # A reuse step in two micro-batches of rank-dependent, unequal sizes whose losses sum
            # to the local mean: this rank's gradient stands for all its samples.
            cut = 1 + rank % (len(x) - 1)
            for part in (slice(0, cut), slice(cut, None)):
                (F.cross_entropy(hooked(x[part]), y[part], reduction="sum") / len(x)).backward()
            logits = None
        else:
            logits = hooked(x)
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
                                        [p for p in hooked.parameters()], retain_graph=True)
                finally:
                    pre._sampling = False
        if logits is not None:
            F.cross_entropy(logits, y).backward()
        if variant == "ddp" and distributed and step == 0:  # what DDP's allreduce left: local/averaged
            for name, p in model.named_parameters():
                saved[f"local/{name}"] = p.grad.numpy().copy()
        if variant == "inject" and distributed and step in (1, 2):
            inject_failures(pre, model, rank, step)
        pre.step()
        for name, p in model.named_parameters():
            if p.grad is not None:                          # frozen and unused parameters have none
                saved[f"{step}/{name}"] = p.grad.numpy().copy()
        with torch.no_grad():                               # a fixed, rank-independent move
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(0.05 * p.grad)
    kinds = np.array([pre._rows(layer, 5)[0] == "per-sample" for layer in pre._layers  # rows a refresh sends
                      if layer.spec is not None])
    if variant == "subgroup":
        rank += 1                                           # files named by global rank
    np.savez(f"{out}.{rank}.npz", owners=np.array(pre._owners or []), kinds=kinds, nu=np.array(pre.last_nu), **saved)
    if distributed:
        # Every rank has finished every collective once the barrier returns; leave without
        # gloo's teardown, which aborted now and then when a peer's connection closed first.
        dist.barrier()
        sys.stdout.flush()
        os._exit(0)


def forked(env, argv, log):
    """A worker forked from test_distributed's fork server (torch and tengrad already imported,
    with one BLAS and OpenMP thread): the environment and arguments of a fresh process, its stdout
    and stderr into the file `log`."""
    os.environ.update(env)
    sys.argv = [__file__] + list(argv)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    main()


if __name__ == "__main__":
    main()
