"""kvmem: the FFN layers of pretrained decoder LMs read as key-value memories.

    import kvmem
    model = kvmem.load("smollm2-135m")            # or a HF dir, a .gguf file, a Hub id
    res = kvmem.query(model, "The capital of France is")
    res.neurons                                    # pandas DataFrame
"""

# kvmem.capture, .intervene, .profile, .query, .search and .trace are the modules, and calling one calls its
# function of the same name (kvmem.callable_module): kvmem.query(model, prompt) and `import kvmem.query` both work.
import kvmem.capture as capture
import kvmem.intervene as intervene
import kvmem.profile as profile
import kvmem.query as query
import kvmem.search as search
import kvmem.trace as trace
from kvmem.capture import run_capture
from kvmem.errors import KvmemError
from kvmem.intervene import intervention
from kvmem.models import FFNLayer, KVModel, from_hf, load, supported
from kvmem.profile import ProfileConfig, merge, open_run
from kvmem.vocab import neuron_vocab, project_values

__version__ = "0.2.0"

__all__ = ["FFNLayer", "KVModel", "KvmemError", "ProfileConfig", "capture", "from_hf", "intervene", "intervention",
           "load", "merge", "neuron_vocab", "open_run", "profile", "project_values", "query", "run_capture", "search",
           "supported", "trace"]
