"""Which modules of a model TENGraD hooks, and the one-TENGraD-per-module rule: the layers found
(supported types, minus skipped names and types and the modules their parents never call), the
refusal of a second TENGraD on a hooked module and of a parameter shared by two hooked layers, and
``release(model)``. Nothing is stored on the modules themselves (weak keys)."""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Dict, Iterable, List, Set, Tuple, Union

import torch.nn as nn

from . import attention, modules
from .capture import _Layer
if TYPE_CHECKING:  # annotations only
    from . import TENGraD

# The TENGraD that hooks each module.
_attached: "weakref.WeakKeyDictionary[nn.Module, TENGraD]" = weakref.WeakKeyDictionary()


def release(model: nn.Module) -> int:
    """Remove every TENGraD attached to a module of `model` (its hooks and native handle), e.g.
    one made by an earlier run of a notebook cell whose variable is gone. Returns how many."""
    found = {id(pre): pre for module in model.modules() for pre in [_attached.get(module)] if pre is not None}
    for pre in found.values():
        pre.remove()
    return len(found)


def find_layers(model: nn.Module, skip: Iterable[Union[str, type]]) -> Tuple[List[_Layer], Dict[str, str]]:
    """The layers to hook, in `named_modules` order, and {name: reason} of the supported modules
    never preconditioned whatever `skip` says. An ``nn.MultiheadAttention`` gives two layers,
    ``<name>.in_proj`` (its packed in-projection) and ``<name>.out_proj``; skipping the attention
    by name or type skips both. Raises for a module another live TENGraD hooks."""
    skip = tuple(skip)
    skip_names = {s for s in skip if isinstance(s, str)}
    skip_types = tuple(s for s in skip if isinstance(s, type))
    skipped = modules.never_called(model)
    unattended = set()  # out_proj of attentions that keep PyTorch's forward: never called as a module
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            prefix = f"{name}." if name else ""
            if name in skip_names or name in skipped or (skip_types and isinstance(module, skip_types)) \
                    or attention.unsupported(module):
                unattended.add(prefix + "out_proj")
                continue
            if prefix + "in_proj" not in skip_names:
                found.append((prefix + "in_proj", attention.projection(module)))
            continue
        if not isinstance(module, modules.SUPPORTED) or name in skip_names or name in skipped or name in unattended:
            continue
        if skip_types and isinstance(module, skip_types):
            continue
        found.append((name, module))
    found = _untie_embeddings(found, skipped)
    seq_first = modules.sequence_first(model)
    layers = []
    for name, module in found:
        modules.ModuleAdapter._check_supported(name, module)
        other = _attached.get(module)
        if other is not None and not other._removed:
            raise ValueError(
                f"TENGraD: layer {name!r} is already preconditioned by another TENGraD (a re-run notebook cell?): "
                "two would precondition its gradient twice. Call remove() on the other one, or "
                "tengrad.torch.release(model) to remove every TENGraD attached to the model")
        layers.append(_Layer(name, module))
        layers[-1].batch_dim = modules.batch_dim(name, module, seq_first)
    if not layers:
        raise ValueError("the model has no nn.Linear, nn.Conv2d, nn.LayerNorm, nn.RMSNorm, nn.Embedding or "
                         "nn.MultiheadAttention layer to precondition")
    return layers, skipped


def _untie_embeddings(found, skipped: Dict[str, str]):
    """An nn.Embedding whose weight another hooked layer also uses (a language model's output
    head tied to its token embedding) is left out, with a note: the other layer keeps its block,
    as before embeddings had blocks (a tied weight has no exact block of its own)."""
    users: Dict[int, List[str]] = {}
    for name, module in found:
        users.setdefault(id(module.weight), []).append(name)
    kept = []
    for name, module in found:
        partners = [n for n in users[id(module.weight)] if n != name]
        if isinstance(module, nn.Embedding) and partners:
            skipped[name] = (f"its weight is tied to {partners[0]!r}'s, which keeps the exact block (a tied weight has "
                             "no block of its own)")
            continue
        kept.append((name, module))
    return kept


def attentions(model: nn.Module, layers: List[_Layer]) -> List[nn.MultiheadAttention]:
    """The attentions whose projections are among `layers`: they run explicitly while hooked."""
    hooked = {id(layer.module) for layer in layers}
    return [m for m in model.modules() if isinstance(m, nn.MultiheadAttention) and not attention.unsupported(m)
            and (id(attention.projection(m)) in hooked or id(m.out_proj) in hooked)]


def edges(model: nn.Module) -> List[str]:
    """Muon's split: the names of the modules a first-order optimizer (AdamW) should train while
    TENGraD's exact blocks go to the hidden layers — the first and the last ``nn.Linear`` /
    ``nn.Conv2d`` in ``named_modules`` order (a usual model's input layer and classifier; the
    projections inside ``nn.MultiheadAttention`` never count), every embedding and every norm.
    ``TENGraD(model, skip=edges(model))``; its ``other_parameters()`` are then theirs."""
    inner = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    weighted = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in inner]
    others = [n for n, m in model.named_modules() if isinstance(m, (nn.Embedding,) + modules.NORMS)]
    return list(dict.fromkeys(([weighted[0], weighted[-1]] if weighted else []) + others))


def preconditioned_parameters(layers: List[_Layer]) -> Set[int]:
    """The ids of the parameters step() replaces; refuses a parameter shared by two layers."""
    owners: Dict[int, str] = {}
    for layer in layers:
        for kind in ("weight", "bias"):
            param = getattr(layer.module, kind, None)
            if param is None:
                continue
            if id(param) in owners:
                raise ValueError(
                    f"TENGraD: layers {owners[id(param)]!r} and {layer.name!r} share one {kind} (tied weights): "
                    "the exact block of a parameter used by two layers is not supported; precondition one of "
                    f"them only (skip=[{layer.name!r}])")
            owners[id(param)] = layer.name
    return set(owners)


def attach(pre: "TENGraD", model: nn.Module) -> None:
    for layer in pre._layers:
        _attached[layer.module] = pre
    pre._attentions = attentions(model, pre._layers)
    for mha in pre._attentions:
        attention.enable(mha)


def detach(pre: "TENGraD") -> None:
    for layer in pre._layers:
        if _attached.get(layer.module) is pre:
            del _attached[layer.module]
    for mha in pre._attentions:
        attention.disable(mha)
    pre._attentions = []
