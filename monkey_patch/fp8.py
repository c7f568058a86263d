"""``--use_fp8``: FP8 training with torchao float8, on the modules ``--fp8_modules`` selects.

Which modules. Candidates are the model's ``nn.Linear`` layers and its MoE routers (``mlp.gate``, a
``Qwen3MoeTopKRouter``: a bare ``(num_experts, hidden)`` weight used through ``F.linear``, so not an
``nn.Linear``). ``--fp8_modules`` is a comma list of presets and regular expressions (matched against the whole
module name, as transformers names it, without peft's ``base_model.model.`` prefix):

* ``routers``: the router gate ``model.layers.<i>.mlp.gate`` of every decoder layer;
* ``edge_layers``: every candidate of the first and the last decoder layer (``q_proj``, ``k_proj``, ``v_proj``,
  ``o_proj``, the router, and ``gate_proj``/``up_proj``/``down_proj`` where the layer is a dense MLP);
* ``lm_head``: the output projection, the model's last linear layer;
* ``brief`` (default): ``routers,edge_layers,lm_head``, the product brief's "first/last linear layers and the
  router gates";
* ``all_linear``: every candidate.

The expert weights are 3D parameters, not linear layers: no selector converts them (``--fp8_experts`` runs their
grouped matmuls in FP8 instead, see below), so ``--use_fast_moe_block`` composes with ``--use_fp8`` unchanged.
A selected module is skipped, with the reason logged, when FP8 cannot take it: a weight dimension not divisible
by 16 (a hardware requirement of FP8 GEMMs: the embedded tiny model's 8-expert routers and its 376-token
``lm_head``; for Qwen3-30B-A3B nothing is skipped), or a layer wrapped by LoRA. ``qwen3_sft.py`` converts before
peft wraps the model, so LoRA adapters train in bf16 on top of FP8 base layers; a model that is already wrapped
keeps its wrapped layers in high precision.

How. ``nn.Linear`` becomes torchao's ``Float8Linear`` (``convert_to_float8_training`` with
``Float8LinearConfig.from_recipe_name(--fp8_recipe)``); a router becomes :class:`Float8Router`, which computes its
logits with the same torchao FP8 matmul. Both keep the original high-precision parameters (the same ``Parameter``
objects, same names), so checkpoints stay ordinary bf16 Hugging Face checkpoints and :func:`revert_fp8` restores
plain modules exactly. torchao has no "unconvert", but it needs none here. Applying twice converts nothing more.

``--fp8_experts`` registers ``fp8_grouped_mm`` in transformers' experts interface: transformers' ``grouped_mm``
experts with both projections through torchao's dynamic FP8 rowwise grouped GEMM
(``torchao.prototype.moe_training``, a prototype API; ``torch._scaled_grouped_mm`` needs SM90+). The GEMM needs
every expert's token group to be a multiple of 16 rows, so each group is padded with zero rows here.
"""

import dataclasses
import logging
import re
from dataclasses import dataclass, field

import torch
from torchao.float8 import Float8LinearConfig, convert_to_float8_training
from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args
from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from turbo_tune.arguments import FP8_MODULE_PRESETS, TurboTuneConfig, fp8_module_selectors
from turbo_tune.errors import ConfigError

from .model_parts import (
    check_swiglu_experts_layout,
    experts_modules,
    register_experts_function,
    set_experts_implementation,
    unwrap_peft,
)

logger = logging.getLogger(__name__)

FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper have FP8 tensor cores
FP8_EXPERTS_MIN_CAPABILITY = (9, 0)  # torch._scaled_grouped_mm
EXPERTS_IMPLEMENTATION = "fp8_grouped_mm"
GROUP_ALIGNMENT = 16
PEFT_PREFIX = "base_model.model."
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_fp8_supported(config: TurboTuneConfig) -> None:
    """Stop before loading anything when this machine cannot run the FP8 kernels the flags ask for."""
    need = FP8_EXPERTS_MIN_CAPABILITY if config.fp8_experts else FP8_MIN_CAPABILITY
    flag = "--fp8_experts" if config.fp8_experts else "--use_fp8"
    need_text = f"compute capability {need[0]}.{need[1]} or newer"
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{flag} needs a CUDA GPU with FP8 tensor cores ({need_text}, e.g. H100/H200) and this machine has "
            "none: elsewhere FP8 matmuls are emulated, slower than full precision. Drop --use_fp8 to train in "
            "full precision."
        )
    capability = torch.cuda.get_device_capability()
    if capability < need:
        raise ConfigError(
            f"{flag} needs a GPU with {need_text}; {torch.cuda.get_device_name()} has "
            f"{capability[0]}.{capability[1]}, without FP8 tensor cores. Drop {flag} (bf16 is the fast path there)."
        )


@dataclass
class Fp8Selection:
    """What ``--fp8_modules`` picks in one model: module names chosen, and those matched but skipped (name → why)."""

    chosen: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _is_candidate(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, Qwen3MoeTopKRouter))


def _preset_names(names: list[str], preset: str) -> set[str]:
    """Logical names (no peft prefix) of candidate modules that a preset picks."""
    def layer_of(name: str) -> int | None:
        match = _LAYER_INDEX.search(name)
        return int(match.group(1)) if match else None

    layers = [layer for name in names if (layer := layer_of(name)) is not None]
    edges = {min(layers), max(layers)} if layers else set()
    picks = {
        "routers": {n for n in names if n.endswith(".mlp.gate")},
        "edge_layers": {n for n in names if layer_of(n) in edges},
        "lm_head": {n for n in names if n == "lm_head"},
        "all_linear": set(names),
    }
    if preset == "brief":
        return picks["routers"] | picks["edge_layers"] | picks["lm_head"]
    return picks[preset]


def _logical_name(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX)


def _full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's shape, also after ZeRO-3 partitioned it at load time (DeepSpeed keeps it in ``ds_shape``)."""
    return getattr(param, "ds_shape", param.shape)


def _skip_reason(module: torch.nn.Module) -> str | None:
    out_dim, in_dim = _full_shape(module.weight)
    if out_dim % 16 or in_dim % 16:
        return f"weight {out_dim}x{in_dim}: FP8 matmuls need both dimensions divisible by 16"
    return None


def select_fp8_modules(model: torch.nn.Module, selectors: str = "brief") -> Fp8Selection:
    """The modules ``--fp8_modules`` converts in ``model``, without touching it.

    Names are the model's own (a peft-wrapped model's keep their prefix). Raises ConfigError when a regex
    matches no module, so a typo does not silently train in full precision.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuner_layers = {name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    inside_lora = {
        name for name, _ in model.named_modules() if any(name.startswith(f"{lora}.") for lora in tuner_layers)
    }
    lora_layers = {name for name in tuner_layers if _is_candidate(model.get_submodule(name).get_base_layer())}
    candidates = {
        _logical_name(name): name
        for name, module in model.named_modules()
        if (_is_candidate(module) and name not in inside_lora) or name in lora_layers
    }
    experts = {
        _logical_name(name): name for name, m in model.named_modules() if hasattr(m, "gate_up_proj")
    }
    picked: set[str] = set()
    for selector in fp8_module_selectors(selectors):
        if selector in FP8_MODULE_PRESETS:
            picked |= _preset_names(list(candidates), selector)
            continue
        matches = {n for n in list(candidates) + list(experts) if re.fullmatch(selector, n)}
        if not matches:
            raise ConfigError(
                f"--fp8_modules '{selector}' matches no module of this model (names look like "
                f"{next(iter(candidates), '?')}); fix the pattern or use a preset ({', '.join(FP8_MODULE_PRESETS)})."
            )
        picked |= matches

    selection = Fp8Selection()
    modules = dict(model.named_modules())
    for logical in sorted(picked, key=_natural_key):
        if logical in experts:
            selection.skipped[experts[logical]] = "3D expert weights, not a linear layer: use --fp8_experts"
            continue
        name = candidates[logical]
        if name in lora_layers:
            selection.skipped[name] = "wrapped by LoRA: FP8 applies before peft wraps the model"
        elif reason := _skip_reason(modules[name]):
            selection.skipped[name] = reason
        else:
            selection.chosen.append(name)
    return selection


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def fp8_linear_config(recipe: str, emulate: bool = False) -> Float8LinearConfig:
    """torchao's config for a recipe name; ``emulate`` runs the FP8 casts with high-precision matmuls (CPU tests)."""
    return dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)


def _linear_mm_config(config: Float8LinearConfig) -> LinearMMConfig:
    """The GEMM settings Float8Linear derives from its config, for the router's matmul."""
    gemms = (config.gemm_config_output, config.gemm_config_grad_input, config.gemm_config_grad_weight)
    return LinearMMConfig(
        *(ScaledMMConfig(config.emulate, gemm.use_fast_accum, False, config.pad_inner_dim) for gemm in gemms)
    )


class Float8Router(Qwen3MoeTopKRouter):
    """Qwen3-MoE's router with its logits computed by torchao's FP8 matmul; everything else as transformers'."""

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        if torch.is_autocast_enabled():  # F.linear would autocast; the FP8 matmul does not (as in Float8Linear)
            hidden_states = hidden_states.to(torch.get_autocast_dtype("cuda"))
        router_logits = matmul_with_hp_or_float8_args.apply(
            hidden_states, self.weight.t(), self.fp8_mm_config, self.fp8_config
        )
        # From here on, transformers 5.23's Qwen3MoeTopKRouter.forward.
        router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)
        router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
        router_top_value = router_top_value.to(router_logits.dtype)
        return router_logits, router_top_value, router_indices


def _convert_router(router: Qwen3MoeTopKRouter, config: Float8LinearConfig) -> None:
    router.__class__ = Float8Router
    router.fp8_config = config
    router.fp8_mm_config = _linear_mm_config(config)


def _is_converted(module: torch.nn.Module) -> bool:
    return isinstance(module, (Float8Linear, Float8Router))


def apply_fp8(
    model: torch.nn.Module,
    recipe: str = "tensorwise",
    selectors: str = "brief",
    experts: bool = False,
    emulate: bool = False,
) -> Fp8Selection:
    """Convert the selected modules of ``model`` in place; modules converted earlier are left as they are."""
    selection = select_fp8_modules(model, selectors)
    config = fp8_linear_config(recipe, emulate)
    modules = dict(model.named_modules())
    todo = {name for name in selection.chosen if not _is_converted(modules[name])}
    for name in todo:
        if isinstance(modules[name], Qwen3MoeTopKRouter):
            _convert_router(modules[name], config)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda _, fqn: fqn in todo)
    logger.info(
        "FP8 (torchao float8, %s recipe) on %d modules: %s", recipe, len(selection.chosen), describe(selection.chosen)
    )
    for name, reason in selection.skipped.items():
        logger.info("FP8 skips %s: %s.", name, reason)
    if experts:
        apply_fp8_experts(model)
    return selection


def revert_fp8(model: torch.nn.Module) -> None:
    """Give back plain ``nn.Linear`` and router modules (same parameters) and transformers' grouped_mm experts."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Float8Router):
            module.__class__ = Qwen3MoeTopKRouter
            del module.fp8_config, module.fp8_mm_config
        elif isinstance(module, Float8Linear):
            with torch.device("meta"):
                linear = torch.nn.Linear(module.in_features, module.out_features, bias=False)
            linear.weight, linear.bias = module.weight, module.bias
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, linear)
    base = unwrap_peft(model)
    if getattr(base.config, "_experts_implementation", None) == EXPERTS_IMPLEMENTATION:
        base.set_experts_implementation("grouped_mm")


def describe(names: list[str]) -> str:
    """Names with the layer index folded: ``model.layers.{0,47}.self_attn.q_proj`` instead of two names."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_LAYER_INDEX.sub(".layers.{}.", name).lstrip("."), []).append(
            m.group(1) if (m := _LAYER_INDEX.search(name)) else ""
        )
    parts = []
    for pattern, layers in groups.items():
        contiguous = len(layers) > 2 and [int(i) for i in layers] == list(range(int(layers[0]), int(layers[-1]) + 1))
        span = f"{layers[0]}-{layers[-1]}" if contiguous else ",".join(layers)
        parts.append(pattern.replace("{}", "{" + span + "}") if "{}" in pattern else pattern)
    return ", ".join(parts) or "none"


def _fp8_grouped_mm(inputs: torch.Tensor, weight_t: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``inputs @ weight_t[e]`` for each row group, in FP8 (rowwise scales), bf16 out: torchao's prototype op."""
    from torchao.prototype.moe_training import _to_fp8_rowwise_then_scaled_grouped_mm

    return _to_fp8_rowwise_then_scaled_grouped_mm(
        inputs, weight_t, offsets, out_dtype=torch.bfloat16, pad_token_groups_for_grouped_mm=False
    )


def fp8_grouped_mm_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' ``grouped_mm`` experts (Qwen3-MoE layout) with FP8 grouped GEMMs.

    Rows are sorted by expert and each expert's group padded with zero rows to a multiple of 16 (FP8 GEMMs need
    it, also along the token dimension of the weight-gradient GEMM). The padded buffer has a fixed size, so no
    host sync; rows past the last group are masked to zero, since the GEMM leaves them unwritten.
    """
    num_tokens, hidden_dim = hidden_states.shape
    top_k = top_k_index.size(-1)
    num_experts = self.num_experts
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    counts = torch.bincount(expert_ids, minlength=num_experts)
    padded_counts = (counts + GROUP_ALIGNMENT - 1) // GROUP_ALIGNMENT * GROUP_ALIGNMENT
    padded_ends = torch.cumsum(padded_counts, 0)
    shift = (padded_ends - padded_counts) - (torch.cumsum(counts, 0) - counts)  # group start, padded minus unpadded
    slots = torch.arange(expert_ids.numel(), device=expert_ids.device) + shift[expert_ids]
    capacity = -(-(expert_ids.numel() + num_experts * (GROUP_ALIGNMENT - 1)) // GROUP_ALIGNMENT) * GROUP_ALIGNMENT
    slot_token = torch.full((capacity,), num_tokens, dtype=torch.long, device=expert_ids.device)
    slot_token[slots] = perm // top_k
    weight_dtype = self.gate_up_proj.dtype
    states = hidden_states.to(weight_dtype)
    padded_states = torch.cat([states, states.new_zeros(1, hidden_dim)])  # the last row feeds the padding slots
    offsets = padded_ends.to(torch.int32)

    gate_up = _fp8_grouped_mm(padded_states[slot_token], self.gate_up_proj.transpose(-2, -1), offsets)
    in_group = (torch.arange(capacity, device=offsets.device) < padded_ends[-1]).unsqueeze(-1)
    gate_up = torch.where(in_group, gate_up, 0)  # unwritten rows may hold NaN; keep them out of both passes
    down = _fp8_grouped_mm(self._apply_gate(gate_up).to(weight_dtype), self.down_proj.transpose(-2, -1), offsets)

    weighted = down[slots] * top_k_weights.reshape(-1)[perm].unsqueeze(-1).to(down.dtype)
    out = down.new_zeros(num_tokens * top_k, hidden_dim).index_copy(0, perm, weighted)  # back to token order
    return out.view(num_tokens, top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def register_fp8_grouped_mm() -> None:
    """Add ``fp8_grouped_mm`` to transformers' experts implementations (idempotent)."""
    register_experts_function(EXPERTS_IMPLEMENTATION, fp8_grouped_mm_experts_forward)


def apply_fp8_experts(model: torch.nn.Module) -> None:
    """Run every experts module of ``model`` through ``fp8_grouped_mm``; dimensions must be multiples of 16."""
    register_fp8_grouped_mm()
    experts = experts_modules(model)
    for module in experts:
        check_swiglu_experts_layout(module, "--fp8_experts")
        gate_up_shape, down_shape = _full_shape(module.gate_up_proj), _full_shape(module.down_proj)
        if any(dim % GROUP_ALIGNMENT for dim in (*gate_up_shape[1:], *down_shape[1:])):
            raise ConfigError(
                f"--fp8_experts: expert weights {tuple(gate_up_shape)} need hidden and intermediate "
                "sizes divisible by 16."
            )
    set_experts_implementation(model, EXPERTS_IMPLEMENTATION)
    logger.info("FP8 grouped GEMMs (torchao, rowwise) for %d experts modules.", len(experts))
