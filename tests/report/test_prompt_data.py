"""The report's prompt page scores neurons by what they write, also behind a post-FFN norm."""

import pytest
import torch

from kvmem.models.kvmodel import from_hf
from kvmem.query import query
from kvmem.report.prompt import prompt_data
from tests.conftest import make_tiny_new

PROMPT = "The keyword def introduces a function"


@pytest.mark.parametrize("name", ["gemma2", "granite"])
def test_prompt_page_scores_match_query_on_post_norm_and_scaled_families(tiny_tokenizer, name):
    model = from_hf(make_tiny_new(name), tiny_tokenizer)
    d = prompt_data(model, PROMPT, top=5, n_tokens=3)  # raised on post-norm families before (no token scale)
    last = d["positions"][-1]["top"]
    q = query(model, PROMPT, top=5, n_tokens=3)  # query is checked against the HF modules in tests/test_query.py
    assert [f"{r['layer']}.{r['neuron']}" for r in last] == q.neurons["id"].tolist()
    torch.testing.assert_close(torch.tensor([r["c"] for r in last]), torch.tensor(q.neurons["contribution"].tolist()),
                               atol=1e-5, rtol=1e-4)
