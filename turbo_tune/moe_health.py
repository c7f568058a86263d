"""Expert health: how evenly each MoE layer's router spreads the tokens over its experts, per logging window.

Every router (``mlp.gate``) already returns its top-k expert indices to the MoE block. A forward hook adds them into
an on-device (layers × experts) count with ``index_add_``: no extra forward, no host sync per step. Only training
forwards count (the trainer arms the hooks around the forward, so neither evaluation nor gradient checkpointing's
recompute in backward counts), and padding tokens are left out when the batch has an attention mask (packed rows have
no padding). Under ``--torch_compile`` the hook is recorded in the compiled layer and replayed right after it, like
transformers' own output-capturing hooks. The count is summed over all processes (one all_reduce) only when a window
is logged or a picture drawn.

With p_e the share of a layer's top-k selections that expert e received in the window, and E experts:

* load ratio ``max_e p_e / mean_e p_e`` = E · max p: 1 when even, E/k when one expert is in every token's top-k;
* router entropy ``-Σ_e p_e log p_e / log E``, the entropy of the load distribution: 1 when even, log k / log E at
  that same collapse; experts that get nothing pull it down even when the busiest one is not far above average.
"""

import logging
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from monkey_patch.torch_compile import decoder_layers, deferred_while_compiling

logger = logging.getLogger(__name__)


def routers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Decoder layer index → its router, for the layers that are MoE (Qwen3-MoE's ``mlp.gate``)."""
    gates = {index: getattr(layer.mlp, "gate", None) for index, layer in enumerate(decoder_layers(model))}
    return {index: gate for index, gate in gates.items() if hasattr(gate, "top_k") and hasattr(gate, "num_experts")}


def expert_load_metrics(counts: np.ndarray, layer_ids: list[int]) -> dict[str, float]:
    """Per layer and worst layer: load ratio (max/mean) and normalised entropy of (layers × experts) selection counts.
    Layers that routed nothing are left out."""
    metrics, ratios, entropies = {}, [], []
    for layer, row in zip(layer_ids, counts, strict=True):
        total = row.sum()
        if total <= 0:
            continue
        shares = row / total
        ratio = float(shares.max() * len(shares))
        nonzero = shares[shares > 0]
        entropy = float(-(nonzero * np.log(nonzero)).sum() / np.log(len(shares)))
        metrics[f"moe_load_max_over_mean/layer_{layer}"] = ratio
        metrics[f"moe_router_entropy/layer_{layer}"] = entropy
        ratios.append(ratio)
        entropies.append(entropy)
    if ratios:
        metrics["moe_load_max_over_mean"] = max(ratios)
        metrics["moe_router_entropy"] = min(entropies)
    return metrics


class ExpertLoadMonitor:
    """Counts each MoE layer's top-k expert selections on the device; see the module doc."""

    def __init__(self, model: torch.nn.Module, warn_ratio: float) -> None:
        gates = routers(model)
        if not gates:
            raise ValueError(f"{type(model).__name__} has no MoE router (mlp.gate) to monitor.")
        self.layer_ids = sorted(gates)
        self.num_experts = gates[self.layer_ids[0]].num_experts
        self.warn_ratio = warn_ratio
        self.warned = False
        self.device_counts: torch.Tensor | None = None  # made on the routers' device at the first count
        shape = (len(self.layer_ids), self.num_experts)
        self.window = np.zeros(shape)  # summed over processes, since the last logged window
        self.since_picture = np.zeros(shape)  # same, since the last picture
        self._armed = False
        self._attention_mask: torch.Tensor | None = None
        self._weights: torch.Tensor | None = None
        # One hook object for every router, which finds its row from the module: a per-layer constant in the hook
        # would be a guard of the compiled layer, and each layer would compile its own graph.
        self._rows = {gates[layer]: row for row, layer in enumerate(self.layer_ids)}
        hook = deferred_while_compiling(self._count)
        for gate in self._rows:
            gate.register_forward_hook(hook)

    @contextmanager
    def counting(self, attention_mask: torch.Tensor | None):
        """Count the router calls inside (one training forward); `attention_mask` marks the real tokens."""
        self._armed, self._attention_mask, self._weights = True, attention_mask, None
        try:
            yield
        finally:
            self._armed, self._attention_mask, self._weights = False, None, None

    def _count(self, module: torch.nn.Module, args: tuple, output: tuple) -> None:
        if not self._armed:
            return
        row = self._rows[module]
        indices = output[2]  # (tokens, top_k) expert ids
        if self.device_counts is None:
            self.device_counts = torch.zeros(len(self.layer_ids), self.num_experts, dtype=torch.long,
                                             device=indices.device)
        if self._weights is None or self._weights.numel() != indices.numel():
            mask = self._attention_mask
            if mask is not None and mask.numel() == indices.shape[0]:  # else no padding (packed rows) or a split
                self._weights = mask.reshape(-1, 1).expand(indices.shape).reshape(-1).to(torch.long)
            else:
                self._weights = torch.ones(indices.numel(), dtype=torch.long, device=indices.device)
        self.device_counts[row].index_add_(0, indices.reshape(-1), self._weights.to(indices.device))

    def _collect(self) -> None:
        """Move the device counts of every process into the host totals; all processes must call this together."""
        counts = self.device_counts
        if counts is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
            counts = torch.zeros(len(self.layer_ids), self.num_experts, dtype=torch.long, device=device)
        summed = counts.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(summed)
        counts.zero_()
        host = summed.cpu().numpy().astype(np.float64)
        self.window += host
        self.since_picture += host

    def pop_metrics(self, step: int, warn: bool = True) -> dict[str, float]:
        """The window's load metrics (summed over processes); every process must call this at the same step."""
        self._collect()
        metrics = expert_load_metrics(self.window, self.layer_ids)
        self.window[:] = 0
        if warn:
            self._warn_once(metrics, step)
        return metrics

    def pop_picture_shares(self) -> np.ndarray | None:
        """Each layer's share of selections per expert since the last picture, or None if nothing was routed;
        every process must call this at the same step."""
        self._collect()
        counts, self.since_picture = self.since_picture, np.zeros_like(self.since_picture)
        totals = counts.sum(axis=1, keepdims=True)
        if not totals.any():
            return None
        return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)

    def _warn_once(self, metrics: dict[str, float], step: int) -> None:
        if self.warned or not self.warn_ratio:
            return
        over = {layer: metrics.get(f"moe_load_max_over_mean/layer_{layer}", 0.0) for layer in self.layer_ids}
        over = {layer: ratio for layer, ratio in over.items() if ratio > self.warn_ratio}
        if not over:
            return
        self.warned = True
        logger.warning(
            "MoE expert load at step %d: in layer(s) %s the busiest expert got %s times an even share of the routed "
            "tokens (moe_load_max_over_mean above --moe_load_warn_ratio %g): the router may be collapsing onto a few "
            "experts. Said once per run; raise --moe_load_warn_ratio to warn later, or set it to 0 to never warn.",
            step, ", ".join(map(str, over)), ", ".join(f"{ratio:.2f}" for ratio in over.values()), self.warn_ratio,
        )
