"""What a run folder holds: the one written contract of ``kvmem profile`` / ``kvmem merge`` output.

Read a run only through ``kvmem.open_run`` (kvmem.profile.run), which checks it against this file: the
format version, the files, the manifest's fields and the tables' columns. Writers (kvmem.profile.job,
kvmem.profile.tables) write what is listed here; ``tests/profile/test_run_contract.py`` compares this
file with a freshly written run both ways, so the two cannot drift apart.

runs/NAME/
  manifest.json        MANIFEST below; written last: its presence means the run is complete
  tokens.safetensors   TOKENS below (kvmem.profile.tokens.TokenStore)
  vocab.parquet        VOCAB below: id -> token string, so examples can be shown without the model
  stats.safetensors    every layer's statistics: tensor ``L{layer}.{name}`` is tensor ``name`` of that layer's
                       ``LayerStats.state_dict()`` (names ``{component}.{key}``); the components and their
                       tensors are defined by kvmem.stats (kvmem.stats.registry lists them), not here; a layer
                       lacking one that applies to it (``LayerStats.missing()``) is refused
  neurons.parquet      NEURONS below: one row per (layer, neuron)
  layers.parquet       LAYERS below: one row per profiled layer
  routing.parquet      ROUTING below, only when mixture-of-experts layers were profiled (the manifest's "moe"):
                       one row per (MoE layer, routed expert)
  analysis/            optional: written by ``kvmem analyze`` (kvmem.analysis.analyze lists its files)
  checkpoint/          only while a run is in progress (in ``NAME.partial/``), never in a finished run

Columns are ``{name: (dtype, description)}``: a description states every threshold its number depends
on. dtypes: int64, float32, float64, string, list[string]. A reader may rely on every column of
``columns`` (and of ``gated`` for a gated FFN); a table may carry more columns than listed (a newer
writer), never fewer: readers check "required columns present", not "no other columns". To add a
column, add its line here and write it in kvmem.profile.tables.

Versions: ``RUN_FORMAT`` is written in the manifest as ``"format"``. Runs written before the field
existed have none and are read as format 1; ``READABLE_FORMATS`` are the formats this kvmem reads, any
other is refused with how to profile the run again. Bump ``RUN_FORMAT`` (and drop old formats from
``READABLE_FORMATS``) when a file's layout changes in a way older readers or this reader cannot follow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmem.errors import KvmemError

RUN_FORMAT = 3
# 1: runs without a "format" field (their statistics still load); 1-2: stream rows across documents, no BOS,
# position 0 in the statistics (Run.layout gives them the legacy RowLayout); 3: the manifest's "layout"
READABLE_FORMATS = (1, 2, 3)

MANIFEST_FILE = "manifest.json"
TOKENS_FILE = "tokens.safetensors"
VOCAB_FILE = "vocab.parquet"
STATS_FILE = "stats.safetensors"
NEURONS_FILE = "neurons.parquet"
LAYERS_FILE = "layers.parquet"
ANALYSIS_DIR = "analysis"

FILES = {
    MANIFEST_FILE: "JSON: model, corpus, settings, kvmem version, time taken (MANIFEST); written last",
    TOKENS_FILE: "the token store: ids, document offsets, shard position (TOKENS)",
    VOCAB_FILE: "id -> token string of the model's tokenizer (VOCAB)",
    STATS_FILE: "every layer's LayerStats state, tensor names L{layer}.{component}.{key} (kvmem.stats)",
    NEURONS_FILE: "one row per (layer, neuron): m > 0 rate, moments, magnitude shares, top example (NEURONS)",
    LAYERS_FILE: "one row per layer: m > 0 figures, magnitude figures, mass-L0, sign quadrants (LAYERS)",
}
ROUTING_FILE = "routing.parquet"
MOE_FILES = {  # required when the manifest has "moe" (mixture-of-experts layers profiled)
    ROUTING_FILE: "one row per (MoE layer, routed expert): load with interval, routing weight, co-selection (ROUTING)",
}
OPTIONAL_FILES = {
    "explanations.parquet": "one row per (neuron, side, sign, explainer): descriptions and scores (columns: "
                            "kvmem.explain.store.COLUMNS; read with Run.explanations)",
    "explain_cache": "folder of kvmem explain / score: cached replies by request hash (replies.jsonl)",
    ANALYSIS_DIR: "folder written by kvmem analyze: {measure}_{table}.parquet, findings.json, analysis.json",
}


# --- stats.safetensors --------------------------------------------------------------------------
def stats_key(layer: int, name: str) -> str:
    """The stats.safetensors name of tensor ``name`` of layer ``layer``'s state: ``L{layer}.{name}``."""
    return f"L{int(layer)}.{name}"


def split_stats_key(key: str) -> tuple[int, str]:
    """``L{layer}.{name}`` -> (layer, name); KvmemError for anything else."""
    head, sep, name = key.partition(".")
    if not sep or not head.startswith("L") or not head[1:].isdigit() or not name:
        raise KvmemError(f"statistics tensor {key!r} is not named L{{layer}}.{{name}}")
    return int(head[1:]), name


# --- tokens.safetensors -------------------------------------------------------------------------
TOKENS = {
    "ids": ("int32", "[n_tokens] token ids, documents back to back (each followed by EOS if the tokenizer has one)"),
    "doc_offsets": ("int64", "[n_docs + 1] document d is ids[doc_offsets[d]:doc_offsets[d+1]] (local to the store)"),
}
TOKENS_OPTIONAL = {
    "shard": ("int64", "[3] continues_doc, offset (global index of ids[0]), doc_base (global id of the first "
                       "document); absent: 0, 0, 0"),
}

# --- the example stores of a layer's statistics (kvmem.profile.run.slots reads them) -----------------
STORES = {
    "top": "the k largest m per neuron, largest first: value, global token index (-1: empty slot)",
    "bottom": "the k smallest (most negative) m per neuron, most negative first",
    "top_docs": "the k documents with the largest max m, each once: value, index of its argmax token, doc",
    "sample": "a uniform sample of k tokens with m > 0 (a hash order rotated per neuron, so not independent "
              "across neurons)",
}


# --- manifest.json ------------------------------------------------------------------------------
MANIFEST = {
    "kvmem_version": ("string", "version of the kvmem that wrote the run"),
    "model.model": ("string", "the model spec profiled (kvmem.load), as resolved"),
    "model.source": ("string", "where the weights were read from"),
    "model.family": ("string", "the adapter family (kvmem models)"),
    "model.model_type": ("string", "the Hugging Face model_type"),
    "model.n_layers": ("int64", "FFN layers of the model"),
    "model.d_model": ("int64", "residual width"),
    "model.d_mlp": ("int64", "neurons per FFN layer"),
    "model.d_vocab": ("int64", "vocabulary size of the unembedding"),
    "model.activation": ("string", "the FFN activation function"),
    "model.gated": ("bool", "gated FFN (SwiGLU, GeGLU): then quadrant statistics and columns exist"),
    "model.fingerprint": ("string", "hash of the weights (kvmem.models.fingerprint); a model given later must match"),
    "model.dtype": ("string", "dtype the model ran in"),
    "model.device": ("string", "device the model ran on"),
    "corpus.source": ("string", "the corpus source (kvmem.profile.corpus)"),
    "corpus.description": ("string", "what the source is, in words"),
    "corpus.n_docs": ("int64", "documents in the token store"),
    "corpus.n_tokens": ("int64", "tokens profiled"),
    "corpus.invalid_utf8_docs": ("int64", "documents decoded with replacement characters"),
    "corpus.ran_out": ("bool", "the corpus ended before settings.tokens were reached"),
    "settings.layers": ("list[int64]", "the profiled layers (resolved)"),
    "settings.seq_len": ("int64", "tokens per model input row, the BOS included (the rows: \"layout\")"),
    "settings.top_k": ("int64", "slots per neuron in each example store"),
    "settings.batch_size": ("int64", "rows per forward pass (resolved)"),
    "settings.*": ("", "every other field of kvmem.profile.runner.ProfileConfig (documented there)"),
    "time.seconds": ("float64", "seconds of the profiling pass (summed over runs for a merge)"),
    "time.tokens_per_second": ("float64", "n_tokens / seconds (null if seconds is 0)"),
}
MANIFEST_OPTIONAL = {
    "format": ("int64", "RUN_FORMAT of the writer; absent in runs written before it existed: read as 1"),
    # format >= 3, required there (kvmem.profile.run.open_run): the model rows, RowLayout.settings() of
    # kvmem.profile.tokens; the rows are rebuilt from these and the token store. Formats 1-2 have none: stream
    # rows of seq_len across documents, no BOS, position 0 kept
    "layout.seq_len": ("int64", "tokens per model row, the BOS included"),
    "layout.bos_id": ("int64", "the BOS prepended to every row (null: none)"),
    "layout.doc_rows": ("bool", "every row inside one document (false: the stream cut into seq_len rows)"),
    "layout.skip_first": ("bool", "row position 0 (the BOS, or the first token without one) left out of the "
                                  "statistics"),
    "layout.pad_id": ("int64", "id at padded positions of a batch (masked out)"),
    "settings.rows": ("string", "format >= 3: doc (rows inside one document) or stream (legacy rows)"),
    "settings.skip_first": ("bool", "format >= 3: row position 0 left out of the statistics"),
    "settings.bos_id": ("int64", "format >= 3: the BOS prepended to every row (null: none)"),
    "model.fingerprint_scheme": ("string", "how the fingerprint was computed; absent in runs of older kvmem, "
                                           "whose fingerprint cannot be checked (they must be profiled again)"),
    "corpus.shard": ("string", "'i/n' for a run of one shard (--shard)"),
    "corpus.n_docs_in_corpus": ("int64", "documents of the whole corpus, for a shard"),
    "corpus.merged_from": ("list[string]", "the runs a merged run was made of, in order"),
    "corpus.note": ("string", "what a merge of independent runs changed"),
    "settings.world_size": ("int64", "torchrun ranks that profiled the run"),
    "time.stages": ("dict", "seconds per stage (load, tokenize, profile, value_projection, writing)"),
    "time.seconds_summed_over_ranks": ("float64", "torchrun: seconds of all ranks' passes added up"),
    "time.stages_rank0": ("dict", "torchrun: seconds per stage on rank 0"),
    # present when the profiled layers include mixture-of-experts layers (then MOE_FILES and the MoE columns)
    "moe.layers": ("list[int64]", "the profiled MoE layers; their neuron statistics are relative to the tokens "
                                  "routed to each neuron's expert"),
    "moe.n_experts": ("int64", "routed experts per MoE layer"),
    "moe.top_k": ("int64", "experts chosen per token"),
    "moe.n_shared": ("int64", "shared experts per MoE layer (every token goes to them)"),
    "moe.neuron": ("string", "what an MoE neuron's statistics are of: raw m, the expert's own activation "
                             "(hook point moe.expert.coef), before the routing weight"),
    "moe.entropy": ("string", "the distributions of the routing entropies (kvmem.stats.routing)"),
}


def manifest_value(manifest: dict, name: str):
    """The value of dotted field ``name`` ('model.d_mlp'); KeyError if absent."""
    value = manifest
    for part in name.split("."):
        if not isinstance(value, dict):
            raise KeyError(name)
        value = value[part]
    return value


def missing_manifest_fields(manifest: dict) -> list[str]:
    """The required MANIFEST fields ``manifest`` lacks, in schema order."""
    out = []
    for name in MANIFEST:
        if name.endswith(".*"):
            continue
        try:
            manifest_value(manifest, name)
        except KeyError:
            out.append(name)
    return out


# --- the tables ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Table:
    """A parquet table of the run: its columns as {name: (dtype, description)}."""

    file: str
    rows: str  # what one row is
    columns: dict  # always present
    gated: dict = field(default_factory=dict)  # present when the model's FFN is gated
    optional: dict = field(default_factory=dict)  # may be absent
    moe: dict = field(default_factory=dict)  # present when MoE layers were profiled (the manifest's "moe")

    def required(self, gated: bool, moe: bool = False) -> list[str]:
        return list(self.columns) + (list(self.gated) if gated else []) + (list(self.moe) if moe else [])

    @property
    def known(self) -> dict:
        """Every documented column: {name: (dtype, description)}."""
        return {**self.columns, **self.gated, **self.optional, **self.moe}

    def check(self, names, where, gated: bool, hint: str = "the run was written by another kvmem",
              moe: bool = False) -> None:
        """Raise a one-line KvmemError naming the file (``where``) and the first required column missing from
        ``names``, ending in ``hint``."""
        have = set(names)
        for name in self.required(gated, moe):
            if name not in have:
                raise KvmemError(f"{where}: no column {name!r} ({self.rows}); {hint}")


def _magnitude(p: int) -> dict:
    """The magnitude columns at τ = p% of the neuron's max |m| (kvmem.profile.tables)."""
    how = ("estimated from the activation histogram, exact where the top (bottom) store holds every token "
           "past τ")
    return {
        f"pos_{p}pct_maxabs": ("float64", f"share of tokens with m > τ = {p}% of the neuron's max |m| ({how})"),
        f"pos_{p}pct_maxabs_err": ("float64", f"the true share of pos_{p}pct_maxabs lies within this of it (0: exact)"),
        f"neg_{p}pct_maxabs": ("float64", f"share of tokens with m < -τ = -{p}% of the neuron's max |m| ({how})"),
        f"neg_{p}pct_maxabs_err": ("float64", f"the true share of neg_{p}pct_maxabs lies within this of it (0: exact)"),
        f"active_{p}pct_maxabs": ("float64", f"share of tokens with |m| > {p}% of the neuron's max |m| (pos + neg)"),
        f"active_{p}pct_maxabs_err": ("float64", f"the true share of active_{p}pct_maxabs lies within this of it"),
    }


NEURON_COLUMNS = {
    "layer": ("int64", "layer (0-based)"),
    "id": ("string", "the neuron as 'layer.neuron'"),
    "neuron": ("int64", "neuron within its layer (0-based)"),
    "n": ("int64", "tokens the neuron's statistics count: the layer's (MoE layers: those routed to its expert)"),
    "count_pos": ("int64", "tokens with m > 0 (exact count)"),
    "firing_rate": ("float64", "count_pos / n: share of tokens with m > 0 (exact)"),
    "mean": ("float64", "mean of m over the tokens"),
    "std": ("float64", "population standard deviation of m over the tokens"),
    "min": ("float32", "smallest m (NaN: no token)"),
    "max": ("float32", "largest m (NaN: no token)"),
    "top_value": ("float32", "m of the top example (= max)"),
    "top_index": ("int64", "global token index of the top example (-1: none)"),
    "bottom_value": ("float32", "m of the bottom example (= min)"),
    "bottom_index": ("int64", "global token index of the bottom example (-1: none)"),
    "top_doc": ("int64", "global id of the document with the largest max m (-1: none)"),
    "top_doc_value": ("float32", "that document's max m"),
    "n_docs": ("int64", "filled slots of the per-document store (at most top_k)"),
    "n_sample": ("int64", "filled slots of the uniform sample of tokens with m > 0 (at most top_k)"),
    "max_abs": ("float32", "max |m| = max(max, -min) (0 before any token)"),
    **_magnitude(1), **_magnitude(10), **_magnitude(50),
    "top_token": ("string", "the token of the top example ('' if none)"),
    "top_context": ("string", "up to 6 tokens before the top example in its document, then its token in ⟦ ⟧"),
}
NEURON_COLUMNS_GATED = {
    "q_pp": ("int64", "tokens with gate > 0 and up > 0 (gate = x·W_gate + b, up = x·W_in + b; -1: an MoE layer's "
                      "expert neuron, for which they are not kept; present when a gated dense layer was profiled)"),
    "q_pn": ("int64", "tokens with gate > 0 and up <= 0"),
    "q_np": ("int64", "tokens with gate <= 0 and up > 0"),
    "q_nn": ("int64", "tokens with gate <= 0 and up <= 0"),
}
NEURON_COLUMNS_MOE = {
    "expert": ("int64", "the neuron's expert (routed: eE, shared: sS; -1 for the rows of dense layers)"),
    "shared": ("bool", "the expert is a shared one (every token goes to it)"),
    "expert_neuron": ("int64", "the neuron's index within its expert (dense layers: the neuron); 'neuron' is "
                               "the flat index e*d_expert + i (shared: after the routed experts)"),
    "expert_share": ("float64", "n / the layer's tokens: the share of tokens routed to the neuron's expert "
                                "(every rate of an MoE neuron is of its expert's n tokens; dense layers: 1)"),
}
NEURON_COLUMNS_OPTIONAL = {
    "value_top_tokens": ("list[string]", "the 5 tokens with the largest v_i·W_U (raw, no final norm); absent in "
                                         "a merge of runs without them"),
    "value_bottom_tokens": ("list[string]", "the 5 tokens with the smallest v_i·W_U (raw, no final norm)"),
}

LAYER_COLUMNS = {
    "layer": ("int64", "layer (0-based)"),
    "d_mlp": ("int64", "neurons in the layer"),
    "n_tokens": ("int64", "tokens seen by the layer"),
    "firing_rate": ("float64", "mean over neurons of the share of tokens with m > 0"),
    "dead": ("int64", "neurons with m > 0 on no token"),
    "dense": ("int64", "neurons with m > 0 on more than 50% of the tokens"),
    "densest": ("string", "'layer.neuron' of the neuron with the highest firing rate (m > 0)"),
    "densest_rate": ("float64", "its firing rate"),
    "l0_mean": ("float64", "mean over tokens of L0, the number of neurons with m > 0 at a token"),
    "l0_median": ("int64", "median over tokens of L0 (smallest L0 whose cumulative share of tokens >= 50%)"),
    "l0_p90": ("int64", "90th percentile over tokens of L0 (smallest L0 whose cumulative share >= 90%)"),
    "max_activation": ("float64", "largest m of any neuron of the layer"),
    "active_10pct_maxabs": ("float64", "mean over neurons of the share of tokens with |m| > 10% of the neuron's "
                                       "max |m| (histogram estimate, as in the neuron table)"),
    "active_10pct_maxabs_err": ("float64", "mean over neurons of the bound of that share"),
    "pos_10pct_maxabs": ("float64", "mean over neurons of the share of tokens with m > 10% of the neuron's max |m|"),
    "pos_10pct_maxabs_err": ("float64", "mean over neurons of the bound of that share"),
    "neg_10pct_maxabs": ("float64", "mean over neurons of the share of tokens with m < -10% of the neuron's max |m|"),
    "neg_10pct_maxabs_err": ("float64", "mean over neurons of the bound of that share"),
    "dense_10pct": ("int64", "neurons with |m| > 10% of their max |m| on more than 50% of the tokens (estimate)"),
    "rare_10pct": ("int64", "neurons with |m| > 10% of their max |m| on fewer than 1% of the tokens (estimate)"),
    "max_abs_activation": ("float64", "largest |m| of any neuron of the layer"),
    "max_abs_neuron": ("string", "'layer.neuron' of the neuron with the largest |m|"),
    "mass50_mean": ("float64", "mean over tokens of the fewest neurons whose |m_i|·‖v_i‖ sum to 50% of "
                               "Σ_i |m_i|·‖v_i‖ (NaN: the run kept no mass statistic)"),
    "mass50_median": ("int64", "median over tokens of that count (null: no mass statistic)"),
    "mass50_p90": ("int64", "90th percentile over tokens of that count (null: no mass statistic)"),
    "mass90_mean": ("float64", "mean over tokens of the fewest neurons whose |m_i|·‖v_i‖ sum to 90% of "
                               "Σ_i |m_i|·‖v_i‖ (NaN: no mass statistic)"),
    "mass90_median": ("int64", "median over tokens of that count (null: no mass statistic)"),
    "mass90_p90": ("int64", "90th percentile over tokens of that count (null: no mass statistic)"),
}
LAYER_COLUMNS_MOE = {
    "n_experts": ("int64", "routed experts of the layer (null: a dense layer)"),
    "top_k": ("float64", "experts per token (the routing's Σ load / n; NaN: a dense layer)"),
    "router_entropy_mean": ("float64", "mean over tokens of H(softmax(router logits)), nats, over all routed "
                                       "experts whatever the family's scoring (NaN: dense)"),
    "router_entropy_std": ("float64", "population standard deviation over tokens of that entropy"),
    "router_entropy_max": ("float64", "log n_experts, its largest value"),
    "sel_entropy_mean": ("float64", "mean over tokens of the entropy of the chosen experts' routing weights "
                                    "renormalised to sum 1, nats"),
    "sel_entropy_std": ("float64", "population standard deviation over tokens of that entropy"),
    "sel_entropy_max": ("float64", "log top_k, its largest value"),
}
LAYER_COLUMNS_GATED = {
    "gate_pos_up_pos": ("float64", "share of (token, neuron) pairs with gate > 0 and up > 0"),
    "gate_pos_up_neg": ("float64", "share with gate > 0 and up <= 0"),
    "gate_neg_up_pos": ("float64", "share with gate <= 0 and up > 0"),
    "gate_neg_up_neg": ("float64", "share with gate <= 0 and up <= 0"),
}

ROUTING_COLUMNS = {
    "layer": ("int64", "the MoE layer (0-based)"),
    "expert": ("int64", "routed expert (0-based)"),
    "n": ("int64", "tokens seen by the layer"),
    "load": ("int64", "tokens routed to the expert (exact count)"),
    "share": ("float64", "load / n: share of the tokens routed to the expert (shares sum to top_k)"),
    "share_lo": ("float64", "Wilson 95% interval of share, low end (tokens taken as independent)"),
    "share_hi": ("float64", "Wilson 95% interval of share, high end"),
    "slot_share": ("float64", "load / Σ load: share of the n·top_k token-slots"),
    "uniform": ("float64", "top_k / n_experts: the share of every expert under an even load"),
    "mean_weight": ("float64", "mean routing weight of the expert over its tokens (NaN: no token)"),
    "std_weight": ("float64", "population standard deviation of that weight (NaN: no token)"),
    "coselected": ("list[int64]", "tokens routed to both this expert and expert j, for j = 0 .. n_experts-1 "
                                  "(entry j = expert: load)"),
}

VOCAB_COLUMNS = {
    "id": ("int64", "token id"),
    "token": ("string", "the token's text as the model's tokenizer decodes it alone"),
}

NEURONS = Table(NEURONS_FILE, "one row per (layer, neuron)", NEURON_COLUMNS, NEURON_COLUMNS_GATED,
                NEURON_COLUMNS_OPTIONAL, NEURON_COLUMNS_MOE)
LAYERS = Table(LAYERS_FILE, "one row per layer", LAYER_COLUMNS, LAYER_COLUMNS_GATED, moe=LAYER_COLUMNS_MOE)
VOCAB = Table(VOCAB_FILE, "one row per token id", VOCAB_COLUMNS)
ROUTING = Table(ROUTING_FILE, "one row per (MoE layer, routed expert)", {}, moe=ROUTING_COLUMNS)
TABLES = {NEURONS_FILE: NEURONS, LAYERS_FILE: LAYERS, VOCAB_FILE: VOCAB, ROUTING_FILE: ROUTING}
