"""The sampled-label ("true") Fisher: labels drawn from the model's softmax, their sum-reduced
cross-entropy backpropagated for the curvature only, ``.grad`` untouched."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class SampledFisher:
    """Mixed into TENGraD."""

    def sample_fisher(self, logits: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
        """For ``fisher="sampled"``: draw labels from softmax(logits) and backpropagate their
        sum-reduced cross-entropy to capture the curvature, leaving ``.grad`` untouched. Call it
        after the forward and before ``loss.backward()`` (it keeps the graph)."""
        self._check_alive()
        if self.fisher != "sampled":
            raise RuntimeError("sample_fisher is for fisher='sampled'")
        if not self._refresh_step():
            return
        waiting = [c for layer in self._layers for c in layer.captures if c.grads is None]
        edges = [capture.edge for capture in waiting if capture.edge is not None]
        if not edges:
            raise RuntimeError("TENGraD: no layer captured its input in a forward since the last curvature pass "
                               "(eval mode, no_grad, or sample_fisher called twice for one forward?)")
        with torch.no_grad():
            probs = torch.softmax(logits.detach().float(), dim=-1)
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        loss = F.cross_entropy(logits, labels, reduction="sum")
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
