"""kvmem: the FFN layers of pretrained decoder LMs read as key-value memories.

    import kvmem
    model = kvmem.load("smollm2-135m")            # or a HF dir, a .gguf file, a Hub id
    res = kvmem.query(model, "The capital of France is")
    res.neurons                                    # pandas DataFrame
"""

from kvmem.capture import capture, run_capture
from kvmem.errors import KvmemError
from kvmem.models import FFNLayer, KVModel, from_hf, load, supported
from kvmem.profile import ProfileConfig, merge, open_run, profile
from kvmem.intervene import intervene, intervention
from kvmem.query import query
from kvmem.search import search
from kvmem.trace import trace
from kvmem.vocab import neuron_vocab, project_values

__version__ = "0.2.0"

__all__ = ["FFNLayer", "KVModel", "KvmemError", "ProfileConfig", "capture", "from_hf", "intervene", "intervention",
           "load", "merge", "neuron_vocab", "open_run", "profile", "project_values", "query", "run_capture", "search",
           "supported", "trace"]
