"""The ``TENGraD`` constructor's checks of its options, and the thread setting's environment test:
every refusal raises before anything is hooked, so a rejected option changes nothing."""
from __future__ import annotations

import os

from .base import BASES
from .graft import GRAFTS


def short_host_spin(environ=os.environ) -> bool:
    """Whether torch's OpenMP workers stop spinning soon after each op (libgomp reads these when
    torch loads): then a second BLAS thread in a short call does not meet a spinning worker."""
    if environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive":
        return True
    try:
        return 0 <= int(environ.get("GOMP_SPINCOUNT", "")) <= 100000
    except ValueError:
        return False


def check_lr(lr) -> float:
    lr = float(lr)
    if not (lr >= 0 and lr != float("inf")):
        raise ValueError(f"lr must be finite and >= 0, got {lr}")
    return lr


def check_options(*, fisher, update_freq, kl_clip, lr, loss_reduction, blas_threads, process_group, token_mode,
                  graft, base, damping_mode, window) -> None:
    """Raise ValueError naming the first option ``TENGraD`` cannot take (alone or with the others)."""
    if fisher not in ("empirical", "sampled"):
        raise ValueError(f"fisher must be 'empirical' or 'sampled', got {fisher!r}")
    if int(update_freq) < 1:
        raise ValueError(f"update_freq must be >= 1, got {update_freq}")
    if kl_clip is not None and (lr is None or not kl_clip > 0):
        raise ValueError("kl_clip needs a positive kl_clip and a learning rate lr (>= 0; at 0 nothing is clipped)")
    if not (blas_threads == "auto" or (isinstance(blas_threads, int) and 0 <= blas_threads <= 1024)):
        raise ValueError(f"blas_threads must be 'auto' or an int in 0..1024, got {blas_threads!r}")
    if token_mode not in ("per-sequence", "per-token"):
        raise ValueError(f"token_mode must be 'per-sequence' or 'per-token', got {token_mode!r}")
    if graft not in GRAFTS:
        raise ValueError(f"graft must be None, 'sgd' or 'adam', got {graft!r}")
    if damping_mode not in ("absolute", "relative"):
        raise ValueError(f"damping_mode must be 'absolute' or 'relative', got {damping_mode!r}")
    if base not in BASES:
        raise ValueError(f"base must be None or 'adam', got {base!r}")
    if not (loss_reduction in ("mean", "sum") or isinstance(loss_reduction, (int, float))):
        raise ValueError(f"loss_reduction must be 'mean', 'sum' or a number, got {loss_reduction!r}")
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= 64:
        raise ValueError(f"window must be an int in 1..64, got {window!r}")
    if process_group is not None and token_mode == "per-token":
        raise ValueError("TENGraD: token_mode='per-token' with a process_group is not supported yet")
    if lr is not None and not callable(lr):
        check_lr(lr)
