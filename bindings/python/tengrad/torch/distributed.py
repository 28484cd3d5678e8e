"""Data-parallel steps with exact global-batch blocks (docs/DESIGN.md §11): rows gathered to each
layer's owner, gradients reduced there (to every rank when grafting or a diagonal base keeps
moments), updates broadcast; failures agreed on by every rank. The DDP communication hook is
``comm_hook.py``'s."""
from __future__ import annotations

import zlib
from typing import List

import numpy as np
import torch

from ..parallel import assign_owners
from ..specs import EmbeddingSpec
from .modules import grad_parts, write_grad


class DataParallel:
    """Mixed into TENGraD."""

    def _owner_map(self) -> List[int]:
        """Layer → owner rank (the library's ``assign_owners``); a layer's cost is the floats of a
        refresh's row plus 4× its parameters (the reuse products). Computed once."""
        import torch.distributed as dist
        if self._owners is None:
            costs = []
            for layer in self._layers:
                if layer.spec is None:  # never ran (an unused head): its parameters, the same on every rank
                    costs.append(5 * sum(p.numel() for p in layer.module.parameters(recurse=False)))
                    continue
                costs.append(self._rows(layer)[1] + 4 * self._pre.array_shapes(layer.id).parameters)
            self._owners = assign_owners(costs, dist.get_world_size(self.process_group))
        return self._owners

    def _data_parallel(self) -> bool:
        """Whether steps run data-parallel (a process group of more than one rank)."""
        return self.process_group is not None and self._world_size() > 1

    def _world_size(self) -> int:
        """Ranks of the process group (one rank: the single-process step, with its fast path)."""
        import torch.distributed as dist
        return dist.get_world_size(self.process_group)

    def _comm_device(self) -> torch.device:
        """Where collective buffers live: NCCL needs the current GPU, gloo and MPI take CPU tensors."""
        import torch.distributed as dist
        if dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _row_plan(self, layer, batch):
        """(kind, width) of the rows this rank sends for a layer in this step (``_rows``): an
        embedding's raw width depends on its tokens this refresh."""
        ids = batch is not None and isinstance(layer.spec, EmbeddingSpec)
        return self._rows(layer, int(np.prod(batch[0].shape[1:])) if ids else 1)

    def _agreement(self, plans) -> List[int]:
        """What every rank must have alike before any exchange, as int64 numbers: the step number,
        a fingerprint of the layers, settings and row widths (an embedding's raw rows: its tokens),
        the set of layers with a gradient this step, and the number of training forwards (train
        mode, gradients on) since the last step."""
        widths = tuple(self._row_plan(layer, batch) for layer, _, _, batch in plans)
        settings = (tuple((layer.name, layer.spec) for layer in self._layers), self.fisher, self.update_freq,
                    self.damping, self.lr, self.kl_clip, self.loss_reduction, self.token_mode, self.damping_mode,
                    self.graft, self.base, self.window, widths)
        present = tuple(layer.name for layer, *_ in plans)
        return [self.steps, zlib.crc32(repr(settings).encode()), zlib.crc32(repr(present).encode()),
                self._train_forwards]

    def _check_agreement(self, rows) -> None:
        """Raises on every rank alike (all see the same gathered rows) when the ranks disagree;
        nothing has been exchanged or written yet."""
        def differ(i):
            return len({row[i] for row in rows}) > 1
        by_rank = lambda i: ", ".join(f"rank {r}: {row[i]}" for r, row in enumerate(rows))  # noqa: E731
        if differ(2):
            raise RuntimeError(f"TENGraD: the ranks are at different steps ({by_rank(2)}): every rank must call "
                               "step() once per training step; no .grad was changed")
        if differ(3):
            raise RuntimeError("TENGraD: the ranks have different layers or settings (layer shapes, fisher, "
                               "update_freq, damping, lr, kl_clip, loss_reduction, token_mode, damping_mode, "
                               "graft, base, window, an embedding's sequence length): change them alike on every "
                               "rank (set_damping, set_lr; pad the embeddings' token ids to one length); no .grad "
                               "was changed")
        if differ(4):
            raise RuntimeError("TENGraD: the ranks differ in which layers have a gradient this step (a layer frozen or "
                               "unused on some ranks only); no .grad was changed")
        if differ(5):
            raise RuntimeError(f"TENGraD: the ranks ran different numbers of training forwards since the last step "
                               f"({by_rank(5)}): did a rank skip step()? No .grad was changed")

    def _distributed_step(self, refresh: bool) -> None:
        import torch.distributed as dist
        group = self.process_group
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        device = self._comm_device()
        # Local checks first; their outcome travels with the sample counts (one small allgather),
        # so a rank that cannot take part makes every rank raise instead of leaving them waiting.
        error, agreement = None, [0, 0, 0, 0]
        try:
            owners = self._owner_map()
            plans = self._plan(refresh)  # layers without a gradient here (frozen, unused) are left out
            local = (plans[0][3][0].shape[0] if plans else 0) if refresh else self._batch
            agreement = self._agreement(plans)
        except Exception as e:  # noqa: BLE001 — reported collectively below
            error, local = e, 0
        counts = [torch.zeros(6, dtype=torch.int64, device=device) for _ in range(size)]
        try:
            dist.all_gather(counts, torch.tensor([local, error is not None] + agreement, dtype=torch.int64,
                                                 device=device), group=group)
        except RuntimeError as e:  # a peer gone (closed connection) or the group's timeout
            raise RuntimeError(
                f"TENGraD: step {self.steps}'s first exchange failed: a peer left the process group or never called "
                "step() (did this rank run more steps than the others?); no .grad was changed") from e
        failed = [r for r, c in enumerate(counts) if c[1].item()]
        if failed:
            if error is not None:
                raise error
            raise RuntimeError(f"TENGraD: the distributed step failed on rank(s) {failed} before any exchange; "
                               "no .grad was changed (the failing ranks raised the cause)")
        self._check_agreement([c.tolist() for c in counts])
        counts = [int(c[0].item()) for c in counts]
        owner_of = {id(layer): owner for layer, owner in zip(self._layers, owners)}
        owners = [owner_of[id(layer)] for layer, *_ in plans]
        m_total = sum(counts)
        if m_total == 0:  # every rank agrees: the same counts reached all
            raise RuntimeError("TENGraD: no rank has a sample in this step; no .grad was changed")
        weight = counts[rank] / m_total
        status, updates, dots = 0, [], 0.0
        replicate = self.graft is not None or self.base is not None
        moments, bases = {}, {}  # graft="adam" and base="adam": installed when the step succeeds
        # Samples of every rank: the global mean gradient weights each rank's mean by its share; a
        # refresh gathers that many rows from each rank to the layer's owner.
        for (layer, w, b, batch), owner in zip(plans, owners):
            # Owners are ranks of the group; torch's dst/src are global ranks (a subgroup without
            # global rank 0 failed every step).
            root = dist.get_global_rank(group, owner) if group is not None and group != dist.group.WORLD else owner
            numel = w.size + (b.size if b is not None else 0)
            kind, width = self._row_plan(layer, batch)
            # This rank's part, built before the layer's collectives: whatever fails here, the
            # rank still takes part in them (with NaN, which makes the owner refuse), so every rank
            # raises instead of its peers waiting for the group's timeout.
            try:
                if weight == 0:  # no samples here: nothing to add (a mean over none is NaN)
                    grad = np.zeros(numel, np.float32)
                else:
                    grad = (np.concatenate([w.ravel(), b.ravel()]) if b is not None else w.ravel()) * np.float32(weight)
                g_sum = torch.from_numpy(np.ascontiguousarray(grad, np.float32)).to(device)
                pad = None
                if refresh:
                    a, g = batch[:2]
                    mask = batch[2] if len(batch) == 3 else None
                    n = a.shape[0]
                    pad = torch.zeros((max(counts), width), dtype=torch.float32)
                    if n == 0:
                        pass
                    elif kind == "raw":  # inputs and per-sample output gradients, written into place
                        if mask is not None:  # an embedding's padding: zero id, zero gradient, as the library masks
                            a = a * mask.astype(np.float32)
                            g = g * mask.astype(np.float32).reshape(mask.shape + (1,) * (g.ndim - mask.ndim))
                        cut = int(np.prod(a.shape[1:]))
                        pad[:n, :cut] = torch.from_numpy(a.reshape(n, -1))
                        pad[:n, cut:] = torch.from_numpy(g.reshape(n, -1))
                        pad[:n, cut:].mul_(self._grad_scale(n))
                    else:
                        pad[:n] = torch.from_numpy(self._pre.per_sample_gradients(layer.id, a, g, self._grad_scale(n),
                                                                                   mask=mask))
                    pad = pad.to(device)
            except Exception as e:  # noqa: BLE001 — every rank learns of it through the owner
                status, error = 1, e
                g_sum = torch.full((numel,), float("nan"), dtype=torch.float32, device=device)
                pad = torch.full((max(counts), width), float("nan"), dtype=torch.float32, device=device) \
                    if refresh else None
            if replicate:  # every rank advances every layer's moments from the global gradient
                dist.all_reduce(g_sum, group=group)
            else:
                dist.reduce(g_sum, dst=root, group=group)
            if refresh:
                gathered = [torch.zeros_like(pad) for _ in range(size)] if rank == owner else None
                dist.gather(pad, gathered, dst=root, group=group)
            # The owner's update, written by the library straight into the array broadcast (gloo
            # and MPI take it in place; NCCL a copy on the GPU); every other rank receives into it.
            flat, uw_out, ub_out = self._update_arrays(layer)
            out = torch.from_numpy(flat) if device.type == "cpu" else torch.empty(numel, dtype=torch.float32,
                                                                                  device=device)
            try:
                if replicate or rank == owner:
                    reduced = g_sum.cpu().numpy()
                    gw = reduced[:w.size].reshape(w.shape).copy()
                    gb = reduced[w.size:].copy() if b is not None else None
                    parts = grad_parts(layer, gw, gb)
                    if self.base is not None:
                        bases.update(self._base_moments_of(parts))
                if rank == owner:
                    if refresh:
                        if self.base is not None:
                            self._set_layer_base(layer, bases)
                        full = torch.cat([blk[:n] for blk, n in zip(gathered, counts)]).cpu().numpy()
                        if kind == "raw":
                            cut = int(np.prod(a.shape[1:]))
                            own = (np.ascontiguousarray(full[:, :cut]).reshape((m_total,) + a.shape[1:]),
                                   np.ascontiguousarray(full[:, cut:]).reshape((m_total,) + batch[1].shape[1:]))
                            fa, fg = self._windowed_rows(layer, own) if self.window > 1 else own
                            self._pre.update_curvature(layer.id, fa, fg, 1.0)
                        else:
                            own = (np.ascontiguousarray(full),)
                            rows, = self._windowed_rows(layer, own) if self.window > 1 else own
                            self._pre.update_curvature_from_gradients(layer.id, rows)
                    uw, ub = self._pre.precondition(layer.id, gw, gb, out=(uw_out, ub_out))
                    scale = 1.0
                    if self.graft is not None:
                        scale = self._graft_scale(self._reference_norm2(parts, moments), (uw, ub))
                    dots += scale * self._pre.layer_stats(layer.id)["update_dot_grad"]
                    if device.type != "cpu":
                        out = torch.from_numpy(flat).to(device)
                elif self.graft == "adam":  # the owner grafts; every rank keeps the moments alike
                    self._reference_norm2(parts, moments)
            except Exception as e:  # noqa: BLE001 — every rank learns of it below
                status, error = 1, e
            dist.broadcast(out, src=root, group=group)
            updates.append((layer, out))
        # One allreduce: a failure flag per rank and this rank's ⟨update, grad⟩ terms of the layers
        # it owns (the global KL sum).
        summary = torch.zeros(size + 1, dtype=torch.float64, device=device)
        summary[rank], summary[size] = float(status), dots if status == 0 else 0.0
        dist.all_reduce(summary, group=group)
        summary = summary.cpu()
        failed = [r for r in range(size) if summary[r].item() != 0]
        if failed:
            message = (f"TENGraD: the distributed step failed on layer owner rank(s) {failed}; no .grad was changed "
                       "and the captures are kept (a retry after fixing the cause equals a clean step)")
            if error is not None:
                raise RuntimeError(f"{message}: {error}") from error
            raise RuntimeError(message)
        nu = self._nu_from_sum(float(summary[size].item()))  # 1 without KL clipping or at lr 0
        for layer, out in updates:
            n = layer.module.weight.numel()
            write_grad(layer.module.weight, out[:n], nu)
            if layer.spec.bias:
                write_grad(layer.module.bias, out[n:], nu)
        self._moments.update(moments)
        self._base_moments.update(bases)
        self._commit_window()
        self.last_nu = nu
        self._finish_step()
