"""Key-value memory analyses (Geva et al. 2021, 2022) and the claims people make about FFNs.

One module per measure, each an API function returning an ``AnalysisResult`` (named DataFrames + meta with
thresholds, token counts and baselines):
  sparsity.sparsity          neurons active per token at explicit thresholds; neurons carrying the output
  coactivation.coactivation  the neurons firing together with given neurons
  composition.composition    FFN predictions no single top memory makes; keep / promotion / elimination
  knockout.knockouts         loss increase for FFN removal, linearization, top-k and random-k zeroing
  agreement.agreement        value top tokens vs the next tokens of the top examples (derangement baseline)
  lexical.lexical            how lexical the keys are; activation kept with truncated context
``analyze(run)`` runs them all and writes RUN/analysis/ (with findings.json); ``compare(paths)`` puts
analyzed runs side by side.
"""

from kvmem.analysis.agreement import agreement
from kvmem.analysis.analyze import MEASURES, analyze, load_analysis
from kvmem.analysis.coactivation import coactivation
from kvmem.analysis.common import Sample, sample_from_corpus, sample_from_ids, sample_from_run
from kvmem.analysis.compare import compare
from kvmem.analysis.composition import composition
from kvmem.analysis.findings import findings
from kvmem.analysis.knockout import knockouts
from kvmem.analysis.lexical import lexical
from kvmem.analysis.result import AnalysisResult
from kvmem.analysis.sparsity import neuron_stats, sparsity

__all__ = ["MEASURES", "AnalysisResult", "Sample", "agreement", "analyze", "coactivation", "compare", "composition",
           "findings", "knockouts", "lexical", "load_analysis", "neuron_stats", "sample_from_corpus", "sample_from_ids",
           "sample_from_run", "sparsity"]
