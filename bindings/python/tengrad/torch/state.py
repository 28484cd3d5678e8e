"""Checkpoints of TENGraD: settings, step counter, layer order and the native state."""
from __future__ import annotations

from ..core import Preconditioner
from . import modules


class Checkpoints:
    """Mixed into TENGraD."""

    def state_dict(self) -> dict:
        """Settings, step counter, layer order and the native state (snapshots included)."""
        return {
            "format": 1,
            "steps": self.steps,
            "fisher": self.fisher,
            "update_freq": self.update_freq,
            "kl_clip": self.kl_clip,
            "lr": self.lr,
            "layers": [layer.name for layer in self._registered],
            "native": self._pre.save_state(),
            "graft": self._graft_state(),
            "base": self._base_state(),
            "window": self._window_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``: the next updates are bit-identical to the saved run's.

        Data-parallel (a ``process_group`` of more than one rank), each layer's snapshot lives on
        its owner rank, so a state saved on one rank (the usual ``if rank == 0: torch.save(...)``)
        lacks the others' snapshots: loaded on every rank, the next step is a refresh (a fresh
        snapshot everywhere) and the run continues from there; settings and the step counter are
        restored as saved."""
        if state.get("format") != 1:
            raise ValueError("not a TENGraD state_dict (format 1)")
        names = list(state["layers"])
        unknown = [n for n in names if n not in self._by_name]
        if unknown:
            raise ValueError(f"state_dict has layers this model lacks: {unknown}")
        self._check_alive()
        fresh = Preconditioner()
        fresh.load_state(state["native"])  # validates the blob before this object changes
        for i, name in enumerate(names):
            saved = fresh.layer_spec(i)
            module = self._by_name[name].module
            kind_ok = modules.same_kind(saved, module)
            mine = self._module_spec(module, getattr(saved, "input_size", None)) if kind_ok else None
            if mine != saved:
                fresh.close()
                raise ValueError(f"state_dict layer {name!r} is {saved}; this model's {name!r} is "
                                 f"{mine if kind_ok else type(module).__name__}")
        self._pre.close()
        self._pre = fresh
        for layer in self._layers:
            layer.id, layer.spec = None, None
        self._registered = []
        for i, name in enumerate(names):
            layer = self._by_name[name]
            layer.id, layer.spec = i, fresh.layer_spec(i)
            self._registered.append(layer)
        self.steps = int(state["steps"])
        self._refresh_after_load = self._data_parallel()
        self.fisher = state["fisher"]
        self.update_freq = int(state["update_freq"])
        self.kl_clip = state["kl_clip"]
        if self._lr_source is None and state["lr"] is not None:  # a callable lr stays: the next step reads
            self.lr = state["lr"]  # it; a state saved with a callable never read has no lr to restore
        self._load_graft_state(state.get("graft", {}))
        self._load_base_state(state.get("base", {}))
        self._load_window_state(state.get("window", {}))
