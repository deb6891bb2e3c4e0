"""Key-value memory analyses (Geva et al. 2021, 2022) and the claims people make about FFNs.

One module per measure; each has an API function returning an ``AnalysisResult`` (named DataFrames + meta with
thresholds, sample sizes, seeds and readouts):
  agreement     value top token vs the token after the key's top trigger (Geva 2021 §4, Figs. 4-6)
  lexical       how lexical the keys are; activation kept with truncated context (§3)
  mutation      activation kept when the first, last or a random prefix token is removed (§3, Fig. 3)
  composition   the four cases of §5.2 (Fig. 11), composition vs active memories (§5.1), residual vs final
                prediction (Figs. 9-10), dominant vs random sub-updates, saturation / elimination (Geva 2022)
  sparsity      neurons active per token (|m| thresholds) and neurons carrying the output
  coactivation  the neurons firing together with given neurons
  knockout      loss increase for FFN removal, linearization, top-k and random-k zeroing
  annotate      a blinded sheet of keys' top triggers with random-direction controls, for human labels
``ci`` gives the intervals, ``rules.toml`` + ``findings`` the verdicts, ``analyze.analyze(run)`` runs the
measures and writes RUN/analysis/. The modules are imported by name (``from kvmem.analysis import agreement``
gives the module: no function here shadows one).
"""

from kvmem.analysis.common import Sample, sample_from_corpus, sample_from_ids, sample_from_run
from kvmem.analysis.result import AnalysisResult

__all__ = ["AnalysisResult", "Sample", "sample_from_corpus", "sample_from_ids", "sample_from_run"]
