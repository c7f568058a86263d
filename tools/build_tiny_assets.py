"""Rebuild assets/tiny-qwen3-moe: the tokenizer (byte-level BPE trained on the bundled task) and the model config.

Run from the repository root: `python tools/build_tiny_assets.py`. The outputs are committed, so training never
needs this script or a download.
"""

import random
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from turbo_tune.modeling import EMBEDDED_MODEL_DIR  # noqa: E402
from turbo_tune.toy_task import make_example  # noqa: E402

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 384

# Qwen's chat format, with {% generation %} around what the assistant says so TRL can mask everything else.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def training_text(num_examples: int = 5000) -> list[str]:
    rng = random.Random(1234)
    lines = []
    for _ in range(num_examples):
        for message in make_example(rng)["messages"]:
            lines.append(f"{message['role']}\n{message['content']}")
    return lines


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(training_text(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def build_config(tokenizer: PreTrainedTokenizerFast) -> Qwen3MoeConfig:
    """Qwen3-MoE in miniature: the real architecture (GQA, q/k norm, 8 experts, top-2) at CPU size."""
    return Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )


def main() -> None:
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(EMBEDDED_MODEL_DIR)
    build_config(tokenizer).save_pretrained(EMBEDDED_MODEL_DIR)
    print(f"wrote {EMBEDDED_MODEL_DIR} (vocab {len(tokenizer)})")


if __name__ == "__main__":
    main()
