"""A model's fingerprint: a hash of what it computes, not of where it was loaded from.

``fingerprint(hf)`` covers
  - the architecture fields of the config (``architecture(config)``: ``config.to_dict()`` without
    paths, versions, dtypes, quantization, labels, token ids, generation and output switches; nested
    sub-configs the same way), so two models with the same weights but, say, another RoPE base or
    norm epsilon differ;
  - every parameter tensor's name and shape, and a strided sample of its values (``SAMPLE`` evenly
    spaced entries of the flattened tensor, every entry if it has fewer), rounded to bfloat16 first,
    so the float32, bfloat16 (and, nearly always, float16) loads of one checkpoint agree.
Every FFN weight, every attention and norm weight, the embedding and the unembedding are sampled:
a fine-tune (which moves nearly every weight) or one edited FFN matrix gives another fingerprint.
An edit confined to entries between the sampled ones is not seen; the run's manifest also keeps
the model's source, so a researcher can tell such copies apart by name.

The same weights loaded from a GGUF file, from kvmem's cached folder or from a copy elsewhere give
one fingerprint. ``SCHEME`` names this recipe; runs record it beside the fingerprint, and a run
written under another scheme (kvmem 0.1 hashed ``config.to_dict()``, paths included) is refused
with a message that says how to profile it again.
"""

from __future__ import annotations

import hashlib
import json

import torch

SCHEME = "weights/1"
SAMPLE = 1 << 16  # entries sampled per tensor

# config keys that do not change what the model computes in kvmem's forward passes
_IGNORED = {
    "_name_or_path", "_model_name_or_path", "_commit_hash", "_attn_implementation", "_attn_implementation_autoset",
    "_attn_implementation_internal", "transformers_version", "dtype", "torch_dtype", "quantization_config",
    "architectures", "id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "task_specific_params",
    "prefix", "tokenizer_class", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id",
    "decoder_start_token_id", "output_attentions", "output_hidden_states", "output_scores", "return_dict",
    "return_dict_in_generate", "use_cache", "torchscript", "chunk_size_feed_forward", "is_encoder_decoder",
    "initializer_range", "initializer_factor", "pruned_heads", "tie_encoder_decoder", "use_return_dict",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature", "top_k", "top_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "typical_p", "diversity_penalty", "num_beam_groups", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "cross_attention_hidden_size", "add_cross_attention", "is_decoder", "pretraining_tp", "gguf_file",
}


def architecture(config) -> dict:
    """The config fields that shape the computation (see the module docstring), nested configs too."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)

    def clean(d: dict) -> dict:
        out = {}
        for k, v in d.items():
            if k in _IGNORED or "dropout" in k:
                continue
            out[k] = clean(v) if isinstance(v, dict) else v
        return out

    return clean(raw)


def _sample(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    if flat.numel() > SAMPLE:
        idx = torch.arange(SAMPLE, device=flat.device, dtype=torch.int64) * flat.numel() // SAMPLE
        flat = flat[idx]
    return flat.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()


@torch.no_grad()
def fingerprint(hf: torch.nn.Module) -> str:
    """16 hex digits identifying the weights and architecture of a HF model (see the module docstring)."""
    h = hashlib.sha256(SCHEME.encode())
    h.update(json.dumps(architecture(hf.config), sort_keys=True, default=str).encode())
    for name, p in sorted(hf.named_parameters(), key=lambda x: x[0]):  # tied weights once
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(_sample(p))
    return h.hexdigest()[:16]
