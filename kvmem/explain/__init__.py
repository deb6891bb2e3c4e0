"""Neurons described in words and scored on held-out examples (``kvmem explain`` / ``kvmem score``).

Modules: data (what an explainer sees of a neuron, the seeded held-out split), prompts, backends (an
OpenAI-compatible endpoint, an in-process transformers model), scorers (pure arithmetic), baseline (the
LLM-free descriptions and lexical rules), explainer (the passes), cache (replies by request hash), store
(RUN/explanations.parquet).
"""

from kvmem.explain.explainer import ExplainConfig, explain, score, select

__all__ = ["ExplainConfig", "explain", "score", "select"]
