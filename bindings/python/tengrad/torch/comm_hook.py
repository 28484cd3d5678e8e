"""The DistributedDataParallel communication hook of a data-parallel TENGraD (docs/DESIGN.md §11):
DDP averages only the gradients TENGraD does not precondition; the preconditioned layers keep
their local gradients, which ``step()`` reduces to each layer's owner."""
from __future__ import annotations

import weakref

import torch


class _CommHookRouter:
    """The one communication hook a DistributedDataParallel model can have (DDP refuses a second
    and cannot remove one): it routes to the live TENGraD attached to the model, and when there
    is none (removed) averages every gradient as DDP's default does, so replicas stay equal."""

    def __init__(self, group):
        self.group = group
        self.current = None  # weakref to the TENGraD whose hook runs

    def attach(self, pre) -> None:
        self.current = weakref.ref(pre)


def _route(router: _CommHookRouter, bucket):
    pre = router.current() if router.current is not None else None
    if pre is not None and not pre._removed:
        return pre.ddp_comm_hook(router.group, bucket)
    import torch.distributed as dist
    buffer = bucket.buffer()
    buffer.div_(dist.get_world_size(router.group))
    return dist.all_reduce(buffer, group=router.group, async_op=True).get_future().then(lambda fut: fut.value()[0])


# The router installed on each DDP model (weak keys: nothing is stored on the model).
_routers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def attach_comm_hook(model, group, pre) -> None:
    """Route `model`'s (a DistributedDataParallel) communication hook to `pre`; installed once per
    model, so a later TENGraD on the same model (after remove()) takes it over."""
    router = _routers.get(model)
    if router is None:
        router = _CommHookRouter(group)
        model.register_comm_hook(router, _route)
        _routers[model] = router
    elif router.group is not group:
        raise ValueError("TENGraD: this DistributedDataParallel model's communication hook was installed for "
                         "another process group")
    router.attach(pre)


class CommHook:
    """Mixed into TENGraD."""

    def ddp_comm_hook(self, group, bucket):
        """A ``DistributedDataParallel`` communication hook that allreduces (averages) only the
        gradients TENGraD does not precondition; preconditioned layers keep their local gradients,
        which ``step()`` reduces to each layer's owner (docs/DESIGN.md §11). Registered
        automatically when the model given to ``TENGraD`` is the DDP module; otherwise
        ``ddp_model.register_comm_hook(process_group, pre.ddp_comm_hook)``."""
        import torch.distributed as dist
        buffer = bucket.buffer()
        others, offset = [], 0
        for param in bucket.parameters():
            n = param.numel()
            if id(param) not in self._preconditioned:
                others.append((offset, n))
            offset += n
        if not others:
            done = torch.futures.Future()
            done.set_result(buffer)
            return done
        flat = torch.cat([buffer[o:o + n] for o, n in others]) / dist.get_world_size(group)  # DDP's average
        future = dist.all_reduce(flat, group=group, async_op=True).get_future()

        def write(fut):
            total, at = fut.value()[0], 0
            for o, n in others:
                buffer[o:o + n].copy_(total[at:at + n])
                at += n
            return buffer
        return future.then(write)
