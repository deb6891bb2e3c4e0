"""The report's value note says what is projected for the run's model: v_i for plain pre-norm families, γ ⊙ v_i
behind a post-FFN norm (from the model's layers when given: OPT-350m's post-LN too), the multiplier for Granite."""

from kvmem.models.kvmodel import from_hf
from kvmem.report.html import values_note
from tests.conftest import make_tiny, make_tiny_new


def test_plain_families_project_v(tiny_tokenizer):
    assert values_note("llama") == "v_i · W_U, no final norm"
    assert values_note("llama", from_hf(make_tiny("llama"), tiny_tokenizer)) == "v_i · W_U, no final norm"


def test_post_norm_models_project_the_gain_times_v(tiny_tokenizer):
    assert values_note("gemma2").startswith("(γ ⊙ v_i) · W_U")
    assert values_note("opt", from_hf(make_tiny_new("opt_postln"), tiny_tokenizer)).startswith("(γ ⊙ v_i) · W_U")
    assert values_note("opt", from_hf(make_tiny_new("opt_proj"), tiny_tokenizer)) == "v_i · W_U, no final norm"
    assert "residual multiplier" in values_note("granite")
