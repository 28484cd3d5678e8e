"""The sampled-label ("true") Fisher: labels drawn from the model's softmax, their sum-reduced
cross-entropy backpropagated for the curvature only, ``.grad`` untouched."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class SampledFisher:
    """Mixed into TENGraD."""

    def sample_fisher(self, logits: torch.Tensor, generator: Optional[torch.Generator] = None,
                      mask: Optional[torch.Tensor] = None) -> None:
        """For ``fisher="sampled"``: draw labels from softmax(logits) and backpropagate their
        sum-reduced cross-entropy to capture the curvature, leaving ``.grad`` untouched. Call it
        after the forward and before ``loss.backward()`` (it keeps the graph).

        ``logits`` is [batch, classes] or, for sequence outputs (a language model),
        [batch, tokens..., vocabulary]: a label is drawn for every token, and a sequence's
        curvature sums its tokens (per token in ``token_mode="per-token"``). ``mask``
        [batch, tokens...] (bool or 0/1; 1 = a token whose loss counts, 0 = padding) leaves the
        padding out of the sampled loss."""
        self._check_alive()
        if self.fisher != "sampled":
            raise RuntimeError("sample_fisher is for fisher='sampled'")
        if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
            raise ValueError("sample_fisher needs logits [batch, classes] or [batch, tokens..., vocabulary]")
        weights = None
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(logits.shape[:-1]):
                raise ValueError(f"sample_fisher: mask must have shape {tuple(logits.shape[:-1])} (the logits' without "
                                 f"the vocabulary), got {tuple(getattr(mask, 'shape', ()))}")
            if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("sample_fisher: mask takes 1 for a token and 0 for padding (bool or 0/1)")
            weights = mask.detach().reshape(-1).to(logits.dtype)
        if not self._refresh_step():
            return
        waiting = [c for layer in self._layers for c in layer.captures if c.grads is None]
        edges = [capture.edge for capture in waiting if capture.edge is not None]
        if not edges:
            raise RuntimeError("TENGraD: no layer captured its input in a forward since the last curvature pass "
                               "(eval mode, no_grad, or sample_fisher called twice for one forward?)")
        flat = logits.reshape(-1, logits.shape[-1])  # one row per sample or token
        with torch.no_grad():
            probs = torch.softmax(flat.detach().float(), dim=-1)
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        losses = F.cross_entropy(flat, labels, reduction="none")
        loss = (losses if weights is None else losses * weights).sum()
        self._sampling = True
        try:
            # Only the layers' output gradients are asked for: autograd skips every weight
            # gradient (half of a backward pass); the tensor hooks on the outputs keep them.
            torch.autograd.grad(loss, edges, retain_graph=True, allow_unused=True)
        except RuntimeError as e:
            if "second time" in str(e) or "freed" in str(e):
                raise RuntimeError("TENGraD: sample_fisher must run before loss.backward(), which frees the graph "
                                   "(or call loss.backward(retain_graph=True))") from e
            raise
        finally:
            self._sampling = False
            for capture in waiting:
                capture.edge = None
