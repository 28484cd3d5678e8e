"""TENGraD for PyTorch: exact natural-gradient preconditioning of ``nn.Linear``, ``nn.Conv2d``,
``nn.LayerNorm`` / ``nn.RMSNorm``, ``nn.Embedding`` and ``nn.MultiheadAttention``'s projections.

    import tengrad.torch as tt

    precond = tt.TENGraD(model, damping=0.1, fisher="sampled", update_freq=1, kl_clip=1e-3, lr=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for x, y in loader:
        optimizer.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        precond.sample_fisher(logits)     # only for fisher="sampled": curvature backward, .grad untouched
        loss.backward()
        precond.step()                    # rewrites each layer's .grad with (F + λI)⁻¹ .grad, in place
        optimizer.step()                  # momentum, weight decay ... as usual

What step() preconditions, which training habits work (accumulation, several forwards before one
backward, edited ``.grad``, a failed step, checkpointing, ``torch.compile``), what is refused and
why, data-parallel training and sequence layers: README ("Quick start — PyTorch", "Sequence
layers", "Reliability", "Distributed"), the ``TENGraD`` docstring and docs/DESIGN.md.

Layout: this module holds the ``TENGraD`` façade (construction, settings, ``step``); the rest is in
rooms mixed into it: ``options`` (the constructor's checks), ``modules`` (the supported module
types), ``attention`` (MHA's projections made visible), ``attach`` (which modules are hooked, Muon's
split ``edges``; one TENGraD per module), ``capture`` (hooks, masks, registration), ``fisher``
(sampled labels), ``batch`` (a step's arrays, accumulation, padding), ``local`` (one process's
step), ``distributed`` and ``comm_hook`` (data parallel, DDP's hook), ``graft`` and ``base``
(step-size grafting, a diagonal base), ``window`` (curvature over the last k batches), ``state``
(checkpoints).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Union

import torch
import torch.nn as nn

from ..core import Preconditioner
from .attach import attach, detach, edges, find_layers, preconditioned_parameters, release
from .batch import Batches
from .capture import Capturing, _Hook, _Layer
from .comm_hook import CommHook, attach_comm_hook
from .distributed import DataParallel
from .fisher import SampledFisher
from .base import DiagonalBases
from .graft import Grafting
from .local import LocalStep
from .modules import ModuleAdapter, bias_of
from .options import check_lr, check_options, short_host_spin
from .state import Checkpoints
from .window import Windows

__all__ = ["TENGraD", "edges", "release"]


class TENGraD(Capturing, ModuleAdapter, SampledFisher, Batches, LocalStep, DataParallel, CommHook, Checkpoints, Grafting,
              DiagonalBases, Windows):
    """Exact block-diagonal natural-gradient preconditioner for a PyTorch model.

    Args:
        model: the network; every ``nn.Linear``, ``nn.Conv2d``, ``nn.LayerNorm`` / ``nn.RMSNorm``,
            ``nn.Embedding`` and ``nn.MultiheadAttention`` in it is preconditioned unless skipped
            (``skipped`` says which are not and why; an embedding called with ids the whole batch
            shares, such as position ids [T], keeps its plain gradient with a warning).
        damping: λ of ``F + λI`` (> 0). Change it later with ``set_damping`` (schedules).
        damping_mode: ``"absolute"`` (default: λ as given) or ``"relative"``: each layer uses λ
            times its batch block's average nonzero eigenvalue, tr(F)/min(m, d), computed at each
            refresh — one λ for layers and losses of any scale (docs/DESIGN.md §16).
        fisher: ``"empirical"`` or ``"sampled"`` (see the module docstring).
        update_freq: refresh the curvature every this many steps (reuse path in between). A
            reuse step's gradient has directions the snapshot does not span, scaled by 1/λ:
            with update_freq > 1 (and with ``fisher="sampled"``) set ``kl_clip`` and ``lr``
            (untuned, without them 3 of 4 models diverged at SGD lr 0.1, 2 of 3 with sampled
            labels; with them none — README "Untuned").
        kl_clip: KL clipping constant κ, or None for no clipping; needs ``lr``.
        lr: the learning rate KL clipping assumes: a number (update it with ``set_lr`` when it
            changes) or a callable returning it, read at each ``step()`` (``lambda:
            opt.param_groups[0]["lr"]`` follows the optimizer's scheduler).
        loss_reduction: ``"mean"``, ``"sum"`` or a per-sample scale for the real loss: the number
            the layers' output gradients are multiplied by to give one sample's gradient
            (``"mean"`` = the batch size; for a loss averaged over all tokens of a batch, in
            per-sequence mode, pass batch · T; in per-token mode, the number of tokens).
        skip: module names (as in ``named_modules``) or module types not to precondition.
        fast_path: allow the one-call path for the empirical Fisher refreshed every step (off by
            default: it ignores edits to ``.grad``; see the module docstring).
        memory_limit: byte cap of the underlying handle (0: none).
        conv_strategy: ``"auto"``, ``"factored"`` or ``"explicit"`` for every conv layer.
        blas_threads: OpenBLAS threads of the library's calls. ``"auto"`` (default): refreshes
            use OpenBLAS's setting; reuse steps (``precondition`` between refreshes) use it too
            when torch's OpenMP workers stop spinning soon after each op (``GOMP_SPINCOUNT`` ≤
            100000 or ``OMP_WAIT_POLICY=passive`` in the environment when torch loaded), and one
            thread otherwise: with libgomp's default spin (~5 ms after each op) a second BLAS
            thread in these short calls is time-sliced against a spinning torch worker (2–4×
            slower; README, "Threads"). Demo ConvNet reuse step: 4.0 → 3.0 ms with two threads
            and ``GOMP_SPINCOUNT=10000``.
            An int n uses n threads for every call (0: OpenBLAS's setting).
        graft: ``None`` (default), ``"sgd"`` or ``"adam"``: per-layer step-size grafting — each
            layer's update keeps TENGraD's direction with the norm of the gradient (``"sgd"``) or of
            an Adam step ``g / (√v̂ + ε)`` (``"adam"``, β₂ 0.999; the moments are kept here and in
            ``state_dict``), so a learning rate and schedule tuned for SGD or Adam carry over
            (graft.py). Data-parallel too (the owner grafts; every rank keeps the moments).
        base: ``None`` (default: ``F + λI``) or ``"adam"``: each layer's block is ``F + λE`` with
            E = diag(e) from Adam's second moment of its gradients (√v̂ normalized to mean 1 per
            layer, clamped to [0.1, 10]; base.py, docs/DESIGN.md §15) — curvature memory
            across batches in the directions one batch does not span. Data-parallel too.
        window: k ≥ 1 (default 1): each refresh's block is the exact Fisher of this refresh's
            batch and the last k − 1 refreshes' batches together (k·m samples, one k·m × k·m
            system; window.py) — curvature memory across batches at (k·m)² Gram cost.
            Data-parallel, each layer's owner keeps the gathered global batches (a loaded
            ``state_dict`` restarts the windows, as it refreshes the snapshots).
        token_mode: for ``nn.Linear`` applied to sequences (inputs [batch, T..., d]; the
            dimensions between batch and features are positions): ``"per-sequence"`` (default) —
            the exact Fisher block of per-sequence gradients, a sequence's gradient summing its
            tokens' — or ``"per-token"``, every token a sample (KFAC's "expand" view, for losses
            that are sums over tokens). docs/DESIGN.md §12.
        process_group: a ``torch.distributed`` process group (gloo; NCCL/MPI backends take the same
            calls) for data-parallel training with exact global-batch blocks (docs/DESIGN.md §11):
            every rank runs the same model on its own samples and calls ``step()``; each layer's
            curvature lives on one owner rank, which gathers the layer's per-sample rows (raw
            inputs and output gradients, or a convolution's per-sample gradients when shorter),
            preconditions the global mean gradient (each rank's mean weighted by its share of the
            samples) and broadcasts the update, so every rank gets the update one process would
            compute on the concatenated batch. ``step()`` replaces the gradient allreduce of the
            preconditioned layers: pass the ``DistributedDataParallel`` module itself as ``model``
            and ``ddp_comm_hook`` is registered so DDP averages only the other parameters (norms,
            embeddings, skipped layers), or use no DDP. A failure on any rank (bad input, NaN, a
            layer without gradient) raises on every rank and changes no ``.grad``. KL clipping uses
            the global sum of ⟨update, grad⟩. With ``graft`` or ``base`` the layers' gradients are
            allreduced (every rank advances the same moments) instead of reduced to the owner.
            ``token_mode="per-token"`` is single-process only.
    """

    def __init__(self, model: nn.Module, damping: float = 0.1, fisher: str = "empirical", update_freq: int = 1,
                 kl_clip: Optional[float] = None, lr: Union[None, float, Callable[[], float]] = None,
                 loss_reduction: Union[str, float] = "mean",
                 skip: Iterable[Union[str, type]] = (), fast_path: bool = False, memory_limit: int = 0,
                 conv_strategy: str = "auto", blas_threads: Union[str, int] = "auto", process_group=None,
                 token_mode: str = "per-sequence", graft: Optional[str] = None, base: Optional[str] = None,
                 damping_mode: str = "absolute", window: int = 1):
        check_options(fisher=fisher, update_freq=update_freq, kl_clip=kl_clip, lr=lr, loss_reduction=loss_reduction,
                      blas_threads=blas_threads, process_group=process_group, token_mode=token_mode, graft=graft,
                      base=base, damping_mode=damping_mode, window=window)
        self.model = model
        self.fisher = fisher
        self.update_freq = int(update_freq)
        self.kl_clip = kl_clip
        self.loss_reduction = loss_reduction
        self.fast_path = fast_path
        self.conv_strategy = conv_strategy
        self.token_mode = token_mode
        self.graft = graft
        self._moments = {}  # graft="adam": {parameter name: (running g², steps)}
        self.base = base
        self.damping_mode = damping_mode
        self._base_moments = {}  # base="adam": {parameter name: (running g², steps)}
        self.window = window
        self._window_batches = {}  # window > 1: {layer name: the last window - 1 refreshes' arrays}
        self._window_pending = {}
        self.blas_threads = blas_threads
        self._short_host_spin = short_host_spin()
        self.process_group = process_group
        self._owners: Optional[List[int]] = None
        self.steps = 0
        self.last_nu = 1.0
        self._sampling = False
        self._removed = False
        self._failed_step = False
        self._forward_id = 0
        self._train_forwards = 0  # training forwards since the last step
        self._refresh_after_load = False  # data parallel: a loaded state lacks other owners' snapshots
        self._batch = 0  # samples of the training forwards since the last step (data-parallel weights)
        self._recount = False  # a step failed: the next training forward starts a new batch
        self._token_mask: Optional[torch.Tensor] = None
        self._root = None  # (shape, ids?) of the running forward's first tensor argument
        self._lr_source = None  # a callable lr: read at each step (a scheduler's lr, no set_lr needed)
        self.lr = None
        if lr is not None:
            self.set_lr(lr)
        self._layers, self.skipped = find_layers(model, skip)  # skipped: {name: why never hooked}
        self._by_name: Dict[str, _Layer] = {layer.name: layer for layer in self._layers}
        self._handles = []
        self._preconditioned = preconditioned_parameters(self._layers)  # ids of the parameters step() replaces
        if process_group is not None and isinstance(model, nn.parallel.DistributedDataParallel):
            attach_comm_hook(model, process_group, self)
        self._pre = Preconditioner(damping=damping, memory_limit=memory_limit)
        self._handles.append(model.register_forward_pre_hook(_Hook(self._root_pre_hook), with_kwargs=True))
        for layer in self._layers:
            self._handles.append(layer.module.register_forward_pre_hook(_Hook(self._make_pre_hook(layer))))
            self._handles.append(layer.module.register_forward_hook(_Hook(self._make_forward_hook(layer))))
        self._registered: List[_Layer] = []  # in registration (= first forward) order
        attach(self, model)

    # -- settings ------------------------------------------------------------------------------
    @property
    def damping(self) -> float:
        return self._pre.damping

    def set_damping(self, damping: float) -> None:
        """Set λ; snapshots are kept and re-factorized at their next use."""
        self._pre.damping = damping

    def set_lr(self, lr: Union[float, Callable[[], float]]) -> None:
        """The learning rate KL clipping assumes: a number (call again when a scheduler changes
        it) or a callable returning it, read at the start of every ``step()`` — e.g.
        ``lambda: opt.param_groups[0]["lr"]``, which follows any scheduler. Finite and >= 0; at 0
        (the end of a cosine schedule) the step is not clipped (ν = 1). A callable that raises or
        returns a bad value makes ``step()`` raise with nothing changed."""
        if callable(lr):
            self._lr_source = lr
        else:
            self.lr, self._lr_source = check_lr(lr), None

    def parameters(self) -> List[nn.Parameter]:
        """The parameters whose gradients ``step()`` preconditions (weights and trainable biases of
        the hooked layers), e.g. to give them and the others (norms, embeddings) different
        optimizers or parameter groups."""
        return [p for layer in self._layers if layer.plain is None for p in (layer.module.weight, bias_of(layer.module))
                if p is not None and p.requires_grad]

    def other_parameters(self) -> List[nn.Parameter]:
        """The model's trainable parameters that ``step()`` leaves alone (skipped or unsupported
        modules, bare parameters): with ``skip=edges(model)``, what AdamW trains in Muon's split."""
        mine = {id(p) for p in self.parameters()}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in mine]

    @property
    def layer_names(self) -> List[str]:
        return [layer.name for layer in self._layers]

    def layer_stats(self, name: str) -> dict:
        """Diagnostics of a hooked layer (see ``Preconditioner.layer_stats``)."""
        layer = self._by_name[name]
        if layer.id is None:
            raise ValueError(f"layer {name!r} has not run a forward pass yet")
        return self._pre.layer_stats(layer.id)

    def remove(self) -> None:
        """Remove the hooks and release the native handle and the kept update arrays (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for layer in self._layers:
            layer.updates = None
        self._pre.close()
        self._removed = True
        detach(self)

    def _check_alive(self) -> None:
        if self._removed:
            raise RuntimeError("TENGraD: this preconditioner was removed (remove() released its hooks and handle)")

    @torch.no_grad()
    def step(self) -> None:
        """Replace ``.grad`` of every hooked layer with its preconditioned update, apply KL clipping,
        and advance the step counter. Call after ``loss.backward()``.

        Atomic: all updates are computed first; ``.grad`` is written only when every layer
        succeeded. If step() raises, every ``.grad`` is as it was and the captured batches are
        kept, so fixing the cause (e.g. ``set_lr``) and calling step() again gives the same result
        as a first call. Gradient accumulation (several forward/backward passes before step()) is
        supported: a refresh uses the union of the micro-batches (see ``loss_reduction``)."""
        self._check_alive()
        self._failed_step = True  # until this step succeeds: a new backward then drops its captures
        self._recount = True  # ... and a new forward restarts the per-step counts
        if self._lr_source is not None:
            self.lr = check_lr(self._lr_source())
        refresh = self._refresh_step()
        if self._data_parallel():
            return self._distributed_step(refresh)
        self._local_step(refresh)
