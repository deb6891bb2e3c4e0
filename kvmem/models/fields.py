"""Field-by-field config checks: every adapter declares what it handles and what it ignores.

An adapter declares, for its family,
  ``handled``  field -> the values it supports: ``ANY``, a tuple of allowed values, or a ``Rule``
               (a predicate with a description, e.g. ``POSITIVE``);
  ``ignored``  fields irrelevant to the FFN key-value view (attention, rotary embeddings, dropout,
               token ids, generation and bookkeeping settings), whatever their value.
``check_fields`` compares the HF config's ``to_dict()`` with that declaration: a field declared
nowhere, or a handled field with an unsupported value, is refused, naming the field. Unlike penzai's
variants there is no fallback to "equal to the config class default": kvmem reads only what an adapter
says it reads, so a field added by a newer transformers release is refused until someone declares it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from kvmem.errors import KvmemError


@dataclass(frozen=True)
class Rule:
    """A supported range of values: ``test(value) -> bool``, described for the error message."""

    test: Callable[[Any], bool]
    text: str

    def __call__(self, value) -> bool:
        try:
            return bool(self.test(value))
        except TypeError:
            return False


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


ANY = Rule(lambda v: True, "any value")
POSITIVE = Rule(lambda v: _is_number(v) and v > 0, "a positive number")
NUMBER = Rule(_is_number, "a number")
POSITIVE_OR_NONE = Rule(lambda v: v is None or (_is_number(v) and v > 0), "None or a positive number")
FALSY = Rule(lambda v: not v, "unset (None, False, 0 or empty)")

# Fields of every transformers config that do not change what an FFN computes or writes.
COMMON_IGNORED = frozenset({
    "_name_or_path", "_model_name_or_path", "architectures", "transformers_version", "model_type", "auto_map",
    "tokenizer_class",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "unk_token_id", "decoder_start_token_id",
    "dtype", "torch_dtype", "use_bfloat16", "id2label", "label2id", "problem_type", "finetuning_task",
    "output_attentions", "output_hidden_states", "return_dict", "use_cache", "torchscript",
    "tie_word_embeddings",  # the adapter reads the LM head module, tied or not
    "initializer_range", "init_std", "initializer_factor", "_attn_implementation_autoset",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature", "top_k", "top_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "num_return_sequences", "prefix",
    "task_specific_params", "tf_legacy_loss", "is_decoder",
})
COMMON_HANDLED = {
    "vocab_size": POSITIVE,
    "chunk_size_feed_forward": (0,),  # chunked FFNs would be computed piecewise
    "is_encoder_decoder": (False,),
    "add_cross_attention": (False, None),
    "pruned_heads": FALSY,
    "tie_encoder_decoder": (False,),
}
# Attention and position settings: they change what x is, never how x becomes m and m·W_out.
ATTENTION = frozenset({
    "num_attention_heads", "num_key_value_heads", "head_dim", "attention_bias", "attention_dropout",
    "max_position_embeddings", "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "_sliding_window_pattern",
    "attn_logit_softcapping", "query_pre_attn_scalar", "use_qk_norm", "original_max_position_embeddings",
    "sliding_window_pattern", "rope_local_base_freq",
})


def describe(allowed) -> str:
    if isinstance(allowed, Rule):
        return allowed.text
    return ", ".join(repr(v) for v in allowed)


def accepts(allowed, value) -> bool:
    if isinstance(allowed, Rule):
        return allowed(value)
    return value in allowed


def check_fields(config, family: str, handled: dict, ignored: frozenset) -> None:
    """Refuse (KvmemError, naming the field) any config field ``family`` neither handles nor ignores,
    and any handled field whose value is outside the supported ones."""
    handled = {**COMMON_HANDLED, **handled}
    ignored = COMMON_IGNORED | ignored
    values = config.to_dict()
    for name in sorted(values):
        value = values[name]
        if name in handled:
            if not accepts(handled[name], value):
                raise KvmemError(f"{family} adapter: config.{name}={value!r} is not supported "
                                 f"(supported: {describe(handled[name])})")
        elif name not in ignored:
            raise KvmemError(f"{family} adapter: config.{name}={value!r} is a setting kvmem's {family} adapter "
                             f"does not know; refusing to guess what it changes")
