"""The optimizers of the race (examples/torch/race.py), each configured as its authors recommend;
the demos' command lines set the knobs a tuning search varies (examples/torch/TUNING.md).

* ``tengrad``: TENGraD's exact blocks under SGD with momentum 0.9 (weight decay ``--tengrad-decay``);
  variants for the ablation: ``--graft sgd|adam`` (per-layer step-size grafting; onto Adam's
  step the momentum averages, dampening 0.9) and ``--tengrad-hidden`` (exact blocks on the hidden
  layers only, AdamW for the first and last layers, norms and embeddings: Muon's practice) and
  ``--tengrad-base adam`` (the block F + λE, E from Adam's second moment), ``--damping-mode
  relative`` (λ times each block's average nonzero eigenvalue), ``--window k`` (each block over
  the last k refreshes' batches) and ``--kl-lr peak`` (KL clipping at the peak lr);
* ``sgd``: SGD, momentum 0.9, weight decay ``--sgd-decay`` (5e-4);
* ``adam``: Adam (L2 weight decay 5e-4), the previous demos' baseline;
* ``adamw``: AdamW, betas (0.9, 0.999), decoupled weight decay ``--adamw-decay``;
* ``muon``: ``torch.optim.Muon`` (momentum 0.95, Nesterov, 5 Newton–Schulz steps, torch's
  defaults) on the hidden weight matrices — convolution filters as [out, in·kh·kw] matrices, as
  in Keller Jordan's CIFAR-10 runs — and AdamW (``--lr-muon-adamw``) for the first layer,
  embeddings, norms, biases and the classifier, Muon's practice;
* ``soap``: heavyball's SOAP, the SOAP paper's settings (betas (0.95, 0.95), Shampoo β 0.95,
  weight decay ``--soap-decay`` 0.01, preconditioner every 10 steps), run eagerly (``compile_mode = None``:
  compiling costs minutes on a CPU);
* ``schedulefree``: ``schedulefree.AdamWScheduleFree`` (betas (0.9, 0.999), weight decay
  ``--schedulefree-decay``); no decay schedule (it replaces one), the common warm-up only, and its
  averaged weights for evaluation (``eval()`` / ``train()``);
* ``kfac``: ASDL's KfacGradientMaker, Monte-Carlo Fisher, its authors' Fashion-MNIST settings by
  default (lr 0.003, damping 0.1, factors every 20 steps, inverses every 100, SGD momentum 0.9,
  weight decay 1e-3, no extra clipping).

Every method but Schedule-Free takes the common schedule (race.py: linear warm-up, then cosine
or linear decay to the end of the budget) on its learning rates.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn

import tengrad.torch as tt

NAMES = ("tengrad", "sgd", "adam", "adamw", "muon", "soap", "schedulefree", "kfac")


@dataclass
class Setup:
    """One optimizer on one model: the torch optimizers it steps, TENGraD or a KFAC gradient
    maker when it has one, and whether the common schedule applies."""
    optimizers: List[torch.optim.Optimizer]
    precond: Optional[object] = None
    kfac: Optional[object] = None
    scheduled: bool = True
    averaged: bool = False  # Schedule-Free: evaluate its averaged weights (eval() / train())
    shadows: List = field(default_factory=list)  # Muon: (2-D view, parameter) pairs
    kl_lr: str = "scheduled"  # TENGraD: the lr KL clipping assumes, "scheduled" or "peak" (--kl-lr)

    def zero_grad(self):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self):
        for flat, param in self.shadows:  # Muon sees convolution filters as matrices
            flat.grad = None if param.grad is None else param.grad.view_as(flat)
        for opt in self.optimizers:
            opt.step()

    def scale_lr(self, factor: float):
        """Sets every group's learning rate to factor × its initial one (TENGraD's KL clipping too)."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] * factor
        if self.precond is not None and self.precond.kl_clip is not None and self.kl_lr == "scheduled":
            self.precond.set_lr(self.optimizers[0].param_groups[0]["lr"])

    def eval(self):
        if self.averaged:
            self.optimizers[0].eval()

    def train(self):
        if self.averaged:
            self.optimizers[0].train()


def _matrices(model: nn.Module):
    """Muon's split: (hidden weight matrices, the rest). Hidden: the weights of the nn.Linear /
    nn.Conv2d modules that ``tt.edges`` (TENGraD's split) does not name, and every attention's
    packed in-projection."""
    edges = set(tt.edges(model))
    hidden = [m.weight for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n not in edges]
    hidden += [m.in_proj_weight for m in model.modules() if isinstance(m, nn.MultiheadAttention)
               and m.in_proj_weight is not None]
    ids = {id(p) for p in hidden}
    return hidden, [p for p in model.parameters() if id(p) not in ids]


def make(name: str, model: nn.Module, args) -> Setup:
    if name == "tengrad":
        graft = None if args.graft == "none" else args.graft
        skip = tt.edges(model) if args.tengrad_hidden else []
        pre = tt.TENGraD(model, damping=args.damping, fisher=args.fisher, update_freq=args.update_freq,
                         kl_clip=args.kl_clip or None, lr=args.lr_tengrad, graft=graft, skip=skip,
                         base=None if args.tengrad_base == "none" else args.tengrad_base,
                         damping_mode=args.damping_mode, window=args.window)
        mine, rest = pre.parameters(), pre.other_parameters()
        if args.tengrad_adamw:  # the ablation's "AdamW on top": Adam's moments of the natural gradient
            opt = torch.optim.AdamW(mine + rest, lr=args.lr_adamw, weight_decay=args.adamw_decay)
            return Setup([opt], precond=pre, kl_lr=args.kl_lr)
        # Grafted onto Adam's step, momentum averages like Adam's β₁ (dampening 0.9) instead of summing.
        opt = torch.optim.SGD(mine, lr=args.lr_tengrad, momentum=0.9, dampening=0.9 if graft == "adam" else 0.0,
                              weight_decay=args.tengrad_decay)
        opts = [opt]
        if rest and args.tengrad_hidden:  # Muon's practice: AdamW for the edges, norms, embeddings
            opts.append(torch.optim.AdamW(rest, lr=args.lr_tengrad_adamw, weight_decay=args.muon_adamw_decay))
        elif rest:  # what TENGraD does not hook (bare parameters, skipped layers): the same SGD
            opt.add_param_group({"params": rest})
        return Setup(opts, precond=pre, kl_lr=args.kl_lr)
    if name == "sgd":
        return Setup([torch.optim.SGD(model.parameters(), lr=args.lr_sgd, momentum=0.9, weight_decay=args.sgd_decay)])
    if name == "adam":
        return Setup([torch.optim.Adam(model.parameters(), lr=args.lr_adam, weight_decay=5e-4)])
    if name == "adamw":
        return Setup([torch.optim.AdamW(model.parameters(), lr=args.lr_adamw, weight_decay=args.adamw_decay)])
    if name == "muon":
        hidden, rest = _matrices(model)
        shadows = [(p.detach().view(p.shape[0], -1), p) for p in hidden]
        muon = torch.optim.Muon([flat for flat, _ in shadows], lr=args.lr_muon, weight_decay=args.muon_decay)
        adamw = torch.optim.AdamW(rest, lr=args.lr_muon_adamw, weight_decay=args.muon_adamw_decay)
        return Setup([muon, adamw], shadows=shadows)
    if name == "soap":
        import heavyball
        heavyball.utils.compile_mode = None
        return Setup([heavyball.SOAP(model.parameters(), lr=args.lr_soap, betas=(0.95, 0.95), shampoo_beta=0.95,
                                     weight_decay=args.soap_decay, precondition_frequency=10)])
    if name == "schedulefree":
        import schedulefree
        opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=args.lr_schedulefree,
                                             weight_decay=args.schedulefree_decay)
        opt.train()
        return Setup([opt], scheduled=False, averaged=True)
    if name == "kfac":
        from asdl import KfacGradientMaker, PreconditioningConfig
        opt = torch.optim.SGD(model.parameters(), lr=args.lr_kfac, momentum=0.9, weight_decay=args.kfac_decay)
        # ASDL refuses nn.MultiheadAttention's out_proj (its weights are read inside the attention
        # function, where no module hook sees them) and fails on the ViT's nn.Embedding ("matrix
        # not calculated"): those keep the plain gradient (SGD momentum), as does in_proj.
        hidden = [m.out_proj for m in model.modules() if isinstance(m, nn.MultiheadAttention)] + \
            [m for m in model.modules() if isinstance(m, nn.Embedding)]
        config = PreconditioningConfig(data_size=args.batch, damping=args.kfac_damping,
                                       curvature_upd_interval=args.kfac_curvature_every,
                                       preconditioner_upd_interval=args.kfac_inverse_every,
                                       ignore_modules=hidden or None)
        return Setup([opt], kfac=KfacGradientMaker(model, config, fisher_type="fisher_mc"))
    raise ValueError(f"unknown optimizer {name!r} (one of {', '.join(NAMES)})")


def add_arguments(ap) -> None:
    """The optimizers' knobs, defaults the tuned winners (TUNING.md) or the authors' settings."""
    ap.add_argument("--fisher", default="sampled", choices=["sampled", "empirical"])
    ap.add_argument("--update-freq", type=int, default=10)
    ap.add_argument("--damping", type=float, default=1.0)
    ap.add_argument("--damping-mode", default="absolute", choices=["absolute", "relative"],
                    help="TENGraD's λ as given, or relative to each block's average eigenvalue (tengrad.torch damping_mode=)")
    ap.add_argument("--kl-clip", type=float, default=1e-2, help="TENGraD's KL clipping κ (0: none)")
    ap.add_argument("--kl-lr", default="scheduled", choices=["scheduled", "peak"],
                    help="the lr KL clipping assumes: the scheduled one (set_lr at each step; while the clip "
                         "binds, lr x nu is constant and the schedule has no effect) or the peak lr (the "
                         "schedule then scales the clipped step)")
    ap.add_argument("--lr-tengrad", type=float, default=0.1)
    ap.add_argument("--graft", default="none", choices=["none", "sgd", "adam"],
                    help="TENGraD's per-layer step-size grafting (tengrad.torch graft=)")
    ap.add_argument("--tengrad-base", default="none", choices=["none", "adam"],
                    help="TENGraD's diagonal base: F + λE with E from Adam's second moment (tengrad.torch base=)")
    ap.add_argument("--window", type=int, default=1,
                    help="TENGraD's curvature window: the last k refreshes' batches in each block (tengrad.torch window=)")
    ap.add_argument("--tengrad-hidden", action=argparse.BooleanOptionalAction, default=False,
                    help="TENGraD on hidden layers only; AdamW (--lr-tengrad-adamw) for the edges, norms, embeddings")
    ap.add_argument("--lr-tengrad-adamw", type=float, default=1e-3)
    ap.add_argument("--tengrad-adamw", action="store_true",
                    help="step TENGraD's preconditioned gradient with AdamW (--lr-adamw, --adamw-decay) instead of SGD")
    ap.add_argument("--lr-sgd", type=float, default=0.1)
    ap.add_argument("--sgd-decay", type=float, default=5e-4, help="SGD's weight decay")
    ap.add_argument("--tengrad-decay", type=float, default=5e-4, help="weight decay of TENGraD's SGD")
    ap.add_argument("--lr-adam", type=float, default=4e-3)
    ap.add_argument("--lr-adamw", type=float, default=1e-3)
    ap.add_argument("--adamw-decay", type=float, default=0.05)
    ap.add_argument("--lr-muon", type=float, default=0.02)
    ap.add_argument("--muon-decay", type=float, default=0.0)
    ap.add_argument("--lr-muon-adamw", type=float, default=1e-3, help="AdamW's lr for what Muon leaves out")
    ap.add_argument("--muon-adamw-decay", type=float, default=0.05,
                    help="that AdamW's weight decay (also TENGraD's with --tengrad-hidden)")
    ap.add_argument("--lr-soap", type=float, default=3e-3)
    ap.add_argument("--soap-decay", type=float, default=0.01)
    ap.add_argument("--lr-schedulefree", type=float, default=2.5e-3)
    ap.add_argument("--schedulefree-decay", type=float, default=0.05)
    ap.add_argument("--schedulefree-warmup", type=float, default=None,
                    help="Schedule-Free's warm-up fraction (default: the race's --warmup)")
    ap.add_argument("--lr-kfac", type=float, default=3e-3)
    ap.add_argument("--kfac-damping", type=float, default=0.1)
    ap.add_argument("--kfac-decay", type=float, default=1e-3)
    ap.add_argument("--kfac-curvature-every", type=int, default=20)
    ap.add_argument("--kfac-inverse-every", type=int, default=100)
