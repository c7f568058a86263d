"""--use_packing: a packed row trains exactly like its examples one by one, and no example sees another.

Both CPU paths are pinned: transformers' own SDPA path (a block-diagonal mask derived from the restarting
position_ids) and our ``varlen_sdpa`` (one causal SDPA per example, no dense mask), which --use_packing picks.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from monkey_patch import attention
from monkey_patch.attention import VARLEN_SDPA, register_varlen_sdpa, varlen_sdpa_attention
from turbo_tune.arguments import TurboTuneConfig
from turbo_tune.modeling import EMBEDDED_MODEL_DIR, attention_implementation

LENGTHS = (7, 13, 5)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def tiny_model(attn: str) -> torch.nn.Module:
    register_varlen_sdpa()
    config = AutoConfig.from_pretrained(EMBEDDED_MODEL_DIR)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)


def examples(seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=generator) for n in LENGTHS]


def pack(seqs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One padding-free row, as TRL's collator makes it (sequence boundaries included), without a KV cache as in
    training: transformers only looks for packed position_ids when there is no cache."""
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    cu = torch.tensor([0, *torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": torch.cat(seqs)[None], "position_ids": position_ids,
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(LENGTHS), "max_length_k": max(LENGTHS),
            "use_cache": False}


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss, leaving out the prediction across each example boundary (TRL masks it too)."""
    log_probs = torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, input_ids[0, 1:, None])[:, 0]
    return -(log_probs * (position_ids[0, 1:] != 0)).sum()


@pytest.mark.parametrize("attn", ["sdpa", VARLEN_SDPA])
@pytest.mark.parametrize("pass_boundaries", [True, False], ids=["cu_seqlens", "position_ids_only"])
def test_packed_loss_and_gradients_match_unpacked(attn, pass_boundaries):
    model = tiny_model("sdpa")
    seqs = examples()
    unpacked = sum(next_token_nll(model(s[None]).logits, s[None], torch.arange(len(s))[None]) for s in seqs)
    unpacked.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    model.set_attn_implementation(attn)
    model.gradient_checkpointing_enable()  # the default in qwen3_sft.py; recomputation must see the same boundaries
    model.train()
    batch = pack(seqs)
    if not pass_boundaries:
        batch = {k: batch[k] for k in ("input_ids", "position_ids", "use_cache")}
    packed = next_token_nll(model(**batch).logits, batch["input_ids"], batch["position_ids"])
    packed.backward()

    assert rel_err(packed.detach(), unpacked.detach()) < 1e-5
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.experts.gate_up_proj", "lm_head.weight"):
        assert rel_err(dict(model.named_parameters())[name].grad, expected_grads[name]) < 1e-4, name


@pytest.mark.parametrize("attn", ["sdpa", VARLEN_SDPA])
def test_no_attention_across_examples(attn):
    model = tiny_model(attn).eval()
    seqs = examples()
    changed = [torch.randint(3, 300, (len(seqs[0]),), generator=torch.Generator().manual_seed(7)), *seqs[1:]]
    second = slice(LENGTHS[0], LENGTHS[0] + LENGTHS[1])
    with torch.no_grad():
        logits = model(**pack(seqs)).logits[0, second]
        logits_changed = model(**pack(changed)).logits[0, second]
        # Without the boundaries (one long causal row), changing example 1 does change example 2: the test can fail.
        leaky = model(input_ids=pack(seqs)["input_ids"], use_cache=False).logits[0, second]
        leaky_changed = model(input_ids=pack(changed)["input_ids"], use_cache=False).logits[0, second]
    assert rel_err(logits_changed, logits) < 1e-6
    assert rel_err(leaky_changed, leaky) > 1e-3


def test_varlen_sdpa_with_padding_mask_matches_sdpa():
    """Padded (unpacked) batches still work under varlen_sdpa: transformers' flash mask hands over the 2D mask."""
    model = tiny_model("sdpa").eval()
    input_ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
        model.set_attn_implementation(VARLEN_SDPA)
        actual = model(input_ids, attention_mask=attention_mask).logits
    assert rel_err(actual[0], expected[0]) < 1e-5
    assert rel_err(actual[1, :6], expected[1, :6]) < 1e-5


def test_varlen_sdpa_matches_masked_sdpa_with_gqa():
    """The attention function alone, grouped-query heads as in Qwen3-30B-A3B (32 query, 4 key/value heads)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 20, 16, generator=generator) for h in (8, 2, 2))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]])
    doc = (position_ids == 0).cumsum(-1)[0]
    mask = (doc[:, None] == doc[None, :]) & torch.ones(20, 20, dtype=torch.bool).tril()
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    module = torch.nn.Module()
    actual, _ = varlen_sdpa_attention(module, q, k, v, None, scaling=None, position_ids=position_ids)
    assert rel_err(actual.transpose(1, 2), expected) < 1e-6


def test_rows_of_one_whole_sequence_go_to_causal_sdpa(monkeypatch):
    """Nothing to split: the rows run transformers' causal sdpa, not the per-sequence path, with the same result."""
    import monkey_patch.attention as attention

    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 12, 16, generator=generator) for h in (8, 2, 2))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    monkeypatch.setattr(attention, "varlen", lambda *args: pytest.fail("split rows that hold one sequence each"))
    position_ids = torch.arange(12).expand(2, -1)
    module = torch.nn.Module()
    module.num_key_value_groups = 4  # as transformers' attention modules carry it
    actual, _ = varlen_sdpa_attention(module, q, k, v, None, scaling=None, position_ids=position_ids)
    assert rel_err(actual.transpose(1, 2), expected) < 1e-6


@pytest.mark.parametrize(("flags", "expected"), [
    ({"use_packing": True}, VARLEN_SDPA),
    ({}, "sdpa"),
    ({"use_packing": True, "attn_implementation": "eager"}, "eager"),
])
def test_packing_chooses_the_padding_free_attention(tmp_path, flags, expected):
    if torch.cuda.is_available():
        pytest.skip("the CPU choice is pinned here; on a GPU flash-attn may win")
    config = TurboTuneConfig(output_dir=str(tmp_path), report_to="none", **flags)
    assert attention_implementation(config) == expected


@pytest.mark.parametrize("flash_attn_2", [True, False])
def test_flash_attention_2_is_chosen_by_its_distribution_not_by_the_flash_attn_package(monkeypatch, tmp_path,
                                                                                        flash_attn_2):
    """flash-attn-4 installs a `flash_attn` package too (its `flash_attn.cute`), without FlashAttention-2's kernels:
    the choice asks transformers' check of the flash-attn distribution."""
    import importlib.util

    import turbo_tune.modeling as modeling

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: object() if name == "flash_attn" else real_find_spec(name, *args))
    config = TurboTuneConfig(output_dir=str(tmp_path), report_to="none", use_packing=True)
    monkeypatch.setattr(modeling, "is_flash_attn_2_available", lambda: flash_attn_2)
    monkeypatch.setattr(modeling, "register_varlen_sdpa", lambda: VARLEN_SDPA)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as the choice can tell
    assert attention_implementation(config) == ("flash_attention_2" if flash_attn_2 else VARLEN_SDPA)


@pytest.mark.parametrize("cpp_wrapper", [False, True])
def test_cuda_varlen_calls_aten_flash_directly_only_under_inductors_cpp_wrapper(monkeypatch, cpp_wrapper):
    monkeypatch.setattr(attention, "_CUDA_VARLEN_KWARGS", {})
    with torch._inductor.config.patch(cpp_wrapper=cpp_wrapper):
        kwargs = attention._varlen_kwargs()
    assert attention._CUDA_VARLEN_KWARGS["aten_flash"] is cpp_wrapper
    assert not {"aten_flash", "takes_scale", "kernel"} & kwargs.keys()
