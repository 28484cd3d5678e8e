"""``nn.MultiheadAttention`` with exact blocks: its packed ``in_proj_weight`` / ``in_proj_bias`` as
one linear layer over tokens (E → 3E, ``InProjection``) and its ``out_proj`` as the ``nn.Linear``
it is. PyTorch's attention reads both weights inside ``F.multi_head_attention_forward``, where no
hook sees the projections' inputs or output gradients, so while a TENGraD is attached a training
forward with gradients runs the same attention explicitly (``Attention``): the projection through
``InProjection`` — the queries, keys and values of a sequence side by side as the tokens of one
sample, each token's output gradient non-zero only in its own third, which makes the block of the
packed weight exactly [G_q X_qᵀ; G_k X_kᵀ; G_v X_vᵀ] per sequence — then
``F.scaled_dot_product_attention`` with the same masks, dropout and causal hint, and ``out_proj``
called as a module. One block for the packed weight rather than three q/k/v blocks: the same Gram
work, one m×m factorization instead of three, and the correlations between q, k and v kept.

Evaluation, ``no_grad`` and copies of the model (``deepcopy``, ``torch.save``: plain
``nn.MultiheadAttention`` again) use PyTorch's own forward."""
from __future__ import annotations

import copyreg
import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def unsupported(mha: nn.MultiheadAttention) -> Optional[str]:
    """Why this attention cannot be run explicitly (None: it can)."""
    if type(mha) not in (nn.MultiheadAttention, Attention):
        return f"a subclass ({type(mha).__name__}) whose forward may differ"
    if not mha._qkv_same_embed_dim:
        return "kdim/vdim differ from embed_dim (separate q/k/v weights): not supported yet"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "add_bias_kv / add_zero_attn are not supported"
    if mha.in_proj_weight is None:
        return "no packed in_proj_weight"
    return None


class InProjection(nn.Module):
    """The packed in-projection of an attention as a layer TENGraD hooks (not a child of the
    model: its ``weight`` and ``bias`` are the attention's ``in_proj_weight`` / ``in_proj_bias``)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self._mha = weakref.ref(mha)
        self.in_features = mha.embed_dim
        self.out_features = 3 * mha.embed_dim

    @property
    def attention(self) -> nn.MultiheadAttention:
        return self._mha()

    @property
    def weight(self) -> nn.Parameter:
        return self.attention.in_proj_weight

    @property
    def bias(self) -> Optional[nn.Parameter]:
        return self.attention.in_proj_bias

    @property
    def training(self) -> bool:  # the attention's mode
        mha = self._mha() if "_mha" in self.__dict__ else None
        return mha.training if mha is not None else False

    @training.setter
    def training(self, value) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


# attention -> its InProjection, for attentions a live TENGraD hooks.
_projections: "weakref.WeakKeyDictionary[nn.MultiheadAttention, InProjection]" = weakref.WeakKeyDictionary()
_users: "weakref.WeakKeyDictionary[nn.MultiheadAttention, int]" = weakref.WeakKeyDictionary()


def projection(mha: nn.MultiheadAttention) -> InProjection:
    """The attention's InProjection (one per attention, kept while it lives)."""
    proj = _projections.get(mha)
    if proj is None:
        proj = _projections[mha] = InProjection(mha)
    return proj


def enable(mha: nn.MultiheadAttention) -> None:
    """Training forwards of `mha` run explicitly (one more TENGraD uses it)."""
    _users[mha] = _users.get(mha, 0) + 1
    mha.__class__ = Attention


def disable(mha: nn.MultiheadAttention) -> None:
    n = _users.get(mha, 0) - 1
    if n > 0:
        _users[mha] = n
        return
    _users.pop(mha, None)
    if type(mha) is Attention:
        mha.__class__ = nn.MultiheadAttention


class Attention(nn.MultiheadAttention):
    """What an attended ``nn.MultiheadAttention`` becomes while a TENGraD hooks it."""

    def __reduce_ex__(self, protocol):
        # Copies and pickles are plain nn.MultiheadAttention (not hooked, no tengrad needed to
        # load): rebuilt by the standard library's reconstructor, then nn.Module's __setstate__.
        return copyreg._reconstructor, (nn.MultiheadAttention, object, None), self.__getstate__()

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not (self.training and torch.is_grad_enabled()) or self not in _projections:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        return _explicit(self, _projections[self], query, key, value, key_padding_mask, need_weights, attn_mask,
                         average_attn_weights, is_causal)


def _explicit(mha, proj, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
              is_causal):
    batched = query.dim() == 3
    self_attention, shared_kv = query is key and key is value, key is value
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    if not mha.batch_first or not batched:  # [T, B, E] -> [B, T, E]
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    B, Tq, E = query.shape
    S, H = key.shape[1], mha.num_heads
    if self_attention:
        q, k, v = proj(query).chunk(3, dim=-1)
    elif shared_kv:
        packed = proj(torch.cat([query, key], dim=1))
        q, k, v = packed[:, :Tq, :E], packed[:, Tq:, E:2 * E], packed[:, Tq:, 2 * E:]
    else:
        packed = proj(torch.cat([query, key, value], dim=1))
        q, k, v = packed[:, :Tq, :E], packed[:, Tq:Tq + S, E:2 * E], packed[:, Tq + S:, 2 * E:]
    q, k, v = (t.reshape(B, t.shape[1], H, E // H).transpose(1, 2) for t in (q, k, v))
    mask = _merged_mask(attn_mask, key_padding_mask, is_causal, B, H, Tq, S, q.dtype, need_weights)
    causal = is_causal and mask is None
    dropout = mha.dropout if mha.training else 0.0
    weights = None
    if need_weights:
        scores = q @ k.transpose(-2, -1) / (E // H) ** 0.5
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        out = F.dropout(weights, p=dropout) @ v
        weights = weights.mean(dim=1) if average_attn_weights else weights
        if not batched:
            weights = weights.squeeze(0)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
    out = mha.out_proj(out.transpose(1, 2).reshape(B, Tq, E))
    if not mha.batch_first or not batched:
        out = out.transpose(0, 1)
    return (out if batched else out.squeeze(1)), weights


def _merged_mask(attn_mask, key_padding_mask, is_causal, B, H, Tq, S, dtype, need_weights):
    """The additive [B or 1, H or 1, Tq, S] mask F.multi_head_attention_forward would apply
    (bool True = not allowed); None when there is none or the causal hint alone stands for it."""
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        return None  # the hint replaces the mask, as PyTorch does

    def additive(m):
        if m is None:
            return None
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
        return m.to(dtype)
    mask = additive(attn_mask)
    if mask is not None:
        mask = mask.view(1, 1, Tq, S) if mask.dim() == 2 else mask.view(B, H, Tq, S)
    kpm = additive(key_padding_mask)
    if kpm is not None:
        kpm = kpm.view(B, 1, 1, S)
        mask = kpm if mask is None else mask + kpm
    return mask
