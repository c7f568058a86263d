"""Where the patches find what they change in a Qwen3-MoE model, whether or not peft wraps it."""

import torch
from peft.tuners.lora.layer import ParamWrapper
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper, or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def experts_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every experts module: transformers 5 keeps each MoE layer's experts as 3D ``gate_up_proj``/``down_proj``."""
    return [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")]


def expert_lora_wrappers(model: torch.nn.Module) -> list[ParamWrapper]:
    """peft's wrappers (``target_parameters``) of the experts' weights."""
    experts = {id(module) for module in experts_modules(model)}
    return [m for m in model.modules() if isinstance(m, ParamWrapper) and id(m.get_base_layer()) in experts]


def check_swiglu_experts_layout(experts: torch.nn.Module, user: str) -> None:
    """The fused experts kernels take concatenated [gate; up] SiLU experts without bias, as Qwen3-MoE has."""
    layout = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
              "has_post_expert_norm": False}
    unsupported = {name: getattr(experts, name, None) for name in layout}
    unsupported = {name: value for name, value in unsupported.items() if value != layout[name]}
    if unsupported:
        raise ValueError(f"{type(experts).__name__} has an experts layout {user} does not support: {unsupported}")
    act = getattr(experts.config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{user} fuses SiLU; {type(experts).__name__} uses hidden_act={act!r}")


def set_experts_implementation(model: torch.nn.Module, implementation: str) -> None:
    """Route every experts module through ``implementation`` of transformers' experts interface."""
    experts = experts_modules(model)
    if not experts:
        raise ValueError(
            f"{type(model).__name__} has no experts modules (with gate_up_proj and down_proj); "
            "the experts patches apply to Qwen3-MoE models only."
        )
    base = unwrap_peft(model)
    if hasattr(base, "set_experts_implementation"):
        base.set_experts_implementation(implementation)
    else:
        for module in experts:
            module.config._experts_implementation = implementation


def register_experts_function(name: str, forward) -> None:
    """Add ``forward`` to transformers' experts interface under ``name`` (idempotent)."""
    if ALL_EXPERTS_FUNCTIONS.get(name) is not forward:
        ExpertsInterface.register(name, forward)
