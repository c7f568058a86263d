"""Efficiency metrics for each logging window: step time, throughput, MFU, time in Python's garbage collector,
memory and time to completion.

The trainer (monkey_patch/sft_trainer.py) shows this callback every micro-batch, so it counts real tokens (padding
excluded) and each sequence's length, which sets the attention FLOPs; it merges `pop_metrics()` into each training
log, so every reporter the Trainer has (MLflow by default) records them beside the loss.
"""

import gc
import os
import resource
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import PretrainedConfig, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

GIB = 2**30

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by the name CUDA reports; the first match wins.
PEAK_BF16_TFLOPS = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("H800", 989.4),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
)


def device_peak_tflops() -> float | None:
    """This device's bf16 peak: TURBO_TUNE_PEAK_TFLOPS if set, else looked up by GPU name; None on CPU."""
    if os.environ.get("TURBO_TUNE_PEAK_TFLOPS"):
        return float(os.environ["TURBO_TUNE_PEAK_TFLOPS"])
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


@dataclass(frozen=True)
class ModelFlops:
    """Training FLOPs (forward + backward = 3 × forward) of a decoder whose MoE layers activate top_k experts.

    Matmuls cost 6 FLOPs per active parameter per token; attention scores and values cost 12 × layers × heads ×
    head_dim per token per token of context (the PaLM convention: no discount for the causal mask).
    """

    flops_per_token: float
    attention_flops_per_token_pair: float

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> "ModelFlops":
        hidden = config.hidden_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        q_dim = config.num_attention_heads * head_dim
        kv_dim = config.num_key_value_heads * head_dim
        attention = hidden * (2 * q_dim + 2 * kv_dim)
        num_experts = getattr(config, "num_experts", 0)
        moe_layers = set(range(config.num_hidden_layers))
        if num_experts:
            moe_layers = {
                layer
                for layer in moe_layers
                if layer not in getattr(config, "mlp_only_layers", [])
                and (layer + 1) % getattr(config, "decoder_sparse_step", 1) == 0
            }
            moe_mlp = hidden * num_experts + config.num_experts_per_tok * 3 * hidden * config.moe_intermediate_size
        else:
            moe_layers = set()
            moe_mlp = 0
        dense_mlp = 3 * hidden * config.intermediate_size
        layers = config.num_hidden_layers
        active = layers * attention + len(moe_layers) * moe_mlp + (layers - len(moe_layers)) * dense_mlp
        active += hidden * config.vocab_size
        return cls(6.0 * active, 12.0 * layers * q_dim)

    def flops(self, tokens: float, sum_squared_lengths: float) -> float:
        return self.flops_per_token * tokens + self.attention_flops_per_token_pair * sum_squared_lengths


def token_counts(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(tokens, sum of squared sequence lengths) of a batch's real sequences, float64 on the batch's device, with no
    host sync, so that counting a micro-batch never stalls the queueing of its kernels. Padded rows count by their
    attention_mask; in packed rows (position_ids restarting at 0) a sequence of length L is L tokens whose 2p + 1
    sum to L²."""
    if "attention_mask" in inputs and inputs["attention_mask"] is not None:
        lengths = inputs["attention_mask"].sum(dim=-1).flatten().to(torch.float64)
        return torch.stack([lengths.sum(), lengths.square().sum()])
    positions = inputs["position_ids"].flatten().to(torch.float64)
    return torch.stack([torch.ones_like(positions).sum(), (2 * positions + 1).sum()])


class GarbageCollectionTimer:
    """Seconds this process has spent in Python's garbage collector since it was created (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started: float | None = None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def start(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def stop(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


class EfficiencyCallback(TrainerCallback):
    def __init__(self, model_flops: ModelFlops, peak_tflops: float | None = None) -> None:
        self.model_flops = model_flops
        self.peak_tflops = peak_tflops
        self.gc_timer = GarbageCollectionTimer()
        self._reset_window(time.perf_counter())

    def _reset_window(self, now: float) -> None:
        self.window_start = now
        self.window_steps = 0
        self.window_counts: torch.Tensor | None = None  # token_counts summed over the window, on the device
        self.window_gc_start = self.gc_timer.seconds

    def observe_batch(self, inputs: dict[str, torch.Tensor]) -> None:
        counts = token_counts(inputs)
        self.window_counts = counts if self.window_counts is None else self.window_counts + counts

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.gc_timer.start()
        self._reset_window(time.perf_counter())

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self.gc_timer.stop()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self.window_steps += 1

    def pop_metrics(self, state: TrainerState) -> dict[str, float]:
        """The window's metrics, reduced over all processes; every process must call this at the same step."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed = max(now - self.window_start, 1e-9)
        local = torch.zeros(2, dtype=torch.float64) if self.window_counts is None else self.window_counts
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            world_size = dist.get_world_size()
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
            local = local.to(device) if device is not None else local
            dist.all_reduce(local)
        tokens, sum_squared_lengths = local.tolist()
        steps = max(self.window_steps, 1)
        step_time = elapsed / steps
        tflops_per_device = self.model_flops.flops(tokens, sum_squared_lengths) / elapsed / world_size / 1e12
        metrics = {
            "step_time_s": step_time,
            "tokens_per_s": tokens / elapsed,
            "tokens_per_s_per_device": tokens / elapsed / world_size,
            "tflops_per_device": tflops_per_device,
            "eta_s": max(state.max_steps - state.global_step, 0) * step_time,
            "gc_s_per_step": (self.gc_timer.seconds - self.window_gc_start) / steps,
            **memory_metrics(),
        }
        if self.peak_tflops:
            metrics["mfu"] = tflops_per_device / self.peak_tflops
        self._reset_window(now)
        return metrics


def memory_metrics() -> dict[str, float]:
    """Peak GPU memory since training began; on CPU, the process's peak resident memory."""
    if torch.cuda.is_available():
        return {
            "peak_memory_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_memory_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        }
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
