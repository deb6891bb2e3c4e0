"""Value vectors in the vocabulary: v_i·W_U for every neuron of a model (Geva et al. 2022).

``project_values(model)`` projects every written value vector (row i of W_out, [d_model]; γ⊙v_i behind a
post-FFN norm, write_scale·v_i with a residual multiplier: see ``value_matrix``) through the
unembedding W_U [d_model, d_vocab], optionally after the final norm (``through_norm``: the
value vector is normalised as if it were the residual stream), and keeps per neuron:

  top_ids, top_logits        [n_layers, d_mlp, k]  the k most promoted tokens (descending logit;
                                                   ids int64 in memory, int32 on disk)
  bottom_ids, bottom_logits  [n_layers, d_mlp, k]  the k most suppressed tokens (ascending logit)
  mean, std                  [n_layers, d_mlp]     mean and (population) std of the neuron's
                                                   projection row over the whole vocabulary
  norm                       [n_layers, d_mlp]     ‖v_i‖ (of the raw value vector)

Layers of different widths (an MoE model with dense layers: DeepSeek-V3's leading layers, Qwen2-MoE's
``mlp_only_layers``) are padded to the widest layer, d_mlp = max width: a padded slot is no neuron (ids 0, the
float tensors NaN); ``ValueProjection.widths`` holds each layer's own width and the table lists real neurons only.

The product is computed in float32 whatever the model's dtype (value rows, the final norm and W_U
cast to float32 before the matmul: a bf16 product rounds logits to 8 bits and reorders or ties top
tokens), on the model's device, one layer at a time, in chunks of c neurons: [c, d_model] @
[d_model, d_vocab] with c·d_vocab·4 bytes ≤ ``chunk_mb`` MiB (the float32 logits slice; the
std_mean temporaries come on top). Besides it, one float32 copy of W_U is held.
Vocabulary ids the tokenizer does not define (unembedding rows padded to a multiple of 64/128, see
``vocab_mask``) are masked: they are never a top or bottom token, and mean/std are over the defined
ids only.
``chunk_mb=None`` does a whole layer at once (the unchunked reference path). Bias terms of the LM head are left out:
they do not depend on the neuron.

On-disk cache (computed once per model): ``kvmem.models.load.cache_dir()/"vocab"/NAME/`` with
NAME = ``{fingerprint}-{dtype}-{raw|norm}-k{k}`` (fingerprint = ``model.fingerprint()``):
  manifest.json        {"format": "kvmem-vocab/2", model, fingerprint, dtype, through_norm, k,
                        n_layers, d_mlp, widths, d_vocab, device, seconds, created}
  tensors.safetensors  the tensors above (ids int32, the rest float32)
  table.parquet        the same as one row per neuron: layer, neuron, id, norm, mean, std,
                       top_tokens, top_logits, top_ids, bottom_tokens, bottom_logits, bottom_ids
                       (list columns; tokens decoded one by one, so ' Paris' keeps its space)
A cached projection with a larger k serves any smaller k. The folder is written atomically.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from kvmem.errors import KvmemError

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel

FORMAT = "kvmem-vocab/2"  # 2: float32 products, undefined ids masked
TENSORS = ("top_ids", "top_logits", "bottom_ids", "bottom_logits", "mean", "std", "norm")
GATED_NOTE = ("gated FFN: the coefficient m_i = act(gate)·up is negative whenever gate and up disagree in sign "
              "(SiLU/GELU are nearly linear for positive gates), and then the neuron writes -v_i: its bottom "
              "tokens are promoted and its top tokens suppressed")


def vocab_strings(model: KVModel) -> np.ndarray:
    """Every token id decoded on its own, [d_vocab] (object array, cached on the model).
    Ids past the tokenizer's vocabulary (padded unembeddings) read '<id N>'."""
    strings = model.__dict__.get("_vocab_strings")
    if strings is None:
        n = min(len(model.tokenizer), model.d_vocab)
        decoded = model.tokenizer.batch_decode([[i] for i in range(n)])
        strings = np.array(decoded + [f"<id {i}>" for i in range(n, model.d_vocab)], dtype=object)
        model.__dict__["_vocab_strings"] = strings
    return strings


def vocab_mask(model: KVModel) -> torch.Tensor:
    """[d_vocab] bool (CPU, cached on the model): True for ids the tokenizer defines (its vocabulary and
    added tokens). Ids past them -- unembedding rows padded to a multiple of 64/128 -- are False."""
    mask = model.__dict__.get("_vocab_mask")
    if mask is None:
        mask = torch.zeros(model.d_vocab, dtype=torch.bool)
        ids = torch.tensor(sorted(set(model.tokenizer.get_vocab().values())), dtype=torch.long)
        ids = ids[(ids >= 0) & (ids < model.d_vocab)]
        if ids.numel() == 0:
            raise KvmemError("the tokenizer defines none of the model's vocabulary ids")
        mask[ids] = True
        model.__dict__["_vocab_mask"] = mask
    return mask


def float32_norm(model: KVModel) -> torch.nn.Module:
    """A float32 copy of the model's final norm (on the model's device; d_model parameters)."""
    import copy

    return copy.deepcopy(model.final_norm).to(dtype=torch.float32)


def project_rows(model: KVModel, v: torch.Tensor, through_norm: bool = False) -> torch.Tensor:
    """v·W_U in float32 for rows v [n, d_model] (after the final norm when ``through_norm``), [n, d_vocab],
    undefined ids -inf. No LM-head bias."""
    with torch.inference_mode():
        v = v.to(model.device, torch.float32)
        if through_norm:
            v = float32_norm(model)(v)
        out = v @ model.W_U.to(torch.float32)
        return out.masked_fill_(~vocab_mask(model).to(out.device), float("-inf"))


def chunk_rows(d_vocab: int, chunk_mb: float | None, d_mlp: int) -> int:
    """Neurons per chunk so that a float32 [c, d_vocab] slice stays under ``chunk_mb`` MiB."""
    if chunk_mb is None:
        return d_mlp
    if chunk_mb <= 0:
        raise KvmemError("the chunk size must be positive")
    return max(1, min(d_mlp, int(chunk_mb * 2**20 // (d_vocab * 4))))


def value_matrix(model: KVModel, layer: int, through_norm: bool, rows: slice | None = None) -> torch.Tensor:
    """Written value vectors of one layer, [d_mlp, d_model] (or a slice of rows), in float32, after the
    final norm (a float32 copy of it) when ``through_norm``. Written: w_i = FFNLayer.value_vectors_written(),
    v_i itself for most families, γ⊙v_i behind a post-FFN norm (Gemma 2/3, OLMo 2), write_scale·v_i with a
    residual multiplier (Granite): what neuron i adds to the residual stream per unit of m_i·s."""
    W = model.layers[layer].value_vectors_written()
    if rows is not None:
        W = W[rows]
    W = W.to(torch.float32)
    return float32_norm(model)(W) if through_norm else W


def value_rows(model: KVModel, pairs, *, through_norm: bool = False, sign=None) -> torch.Tensor:
    """w_i·W_U (or final_norm(w_i)·W_U) in float32 for (layer, neuron) pairs, [n, d_vocab], undefined ids -inf;
    ``sign`` [n] flips rows (what a negative coefficient writes). The rows ``compute_projection`` ranks."""
    v = torch.stack([model.layers[layer].value_vectors_written()[neuron] for layer, neuron in pairs])
    if sign is not None:
        v = v * torch.as_tensor(sign, device=v.device, dtype=v.dtype)[:, None]
    return project_rows(model, v, through_norm)


@dataclass
class ValueProjection:
    """The whole model's value vectors projected to the vocabulary (see the module docstring)."""

    model: str
    fingerprint: str
    through_norm: bool
    k: int
    tensors: dict[str, torch.Tensor]  # CPU tensors, shapes in the module docstring
    strings: np.ndarray = field(repr=False)  # [d_vocab] token strings
    seconds: float = 0.0  # time the projection took to compute
    cached: bool = False  # loaded from disk
    path: Path | None = None  # cache folder, if written or read
    ids: list[str] | None = field(default=None, repr=False)  # printed neuron ids, layer-major (MoE: L.eE.N)
    widths: list[int] | None = None  # each layer's width (None: all d_mlp); wider layers pad the others
    _table: pd.DataFrame | None = field(default=None, repr=False)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    @property
    def n_layers(self) -> int:
        return self.tensors["norm"].shape[0]

    @property
    def d_mlp(self) -> int:
        return self.tensors["norm"].shape[1]

    def width(self, layer: int) -> int:
        """The number of neurons of ``layer`` (the rest of its d_mlp slots are padding)."""
        return self.d_mlp if self.widths is None else self.widths[layer]

    @property
    def table(self) -> pd.DataFrame:
        """One row per neuron (layer-major), with token strings; built on first use."""
        if self._table is None:
            self._table = _table(self.tensors, self.strings, self.ids, self.widths)
        return self._table

    def manifest(self) -> dict:
        return {"format": FORMAT, "model": self.model, "fingerprint": self.fingerprint,
                "through_norm": self.through_norm, "k": self.k, "n_layers": self.n_layers, "d_mlp": self.d_mlp,
                "widths": self.widths,
                "d_vocab": len(self.strings), "seconds": self.seconds, "path": str(self.path) if self.path else None,
                "cached": self.cached}


def _ids(model) -> list[str] | None:
    """Printed ids of every neuron, layer-major, for a model with MoE layers (None: dense ids 'L.N')."""
    from kvmem.neurons import neuron_name

    if not any(hasattr(lay, "layout") for lay in model.layers):
        return None
    return [neuron_name(model, i, n) for i, lay in enumerate(model.layers) for n in range(lay.d_mlp)]


def _widths(model) -> list[int] | None:
    """Each layer's width where they differ (None: one width)."""
    widths = [lay.d_mlp for lay in model.layers]
    return widths if len(set(widths)) > 1 else None


def _table(t: dict[str, torch.Tensor], strings: np.ndarray, ids: list[str] | None = None,
           widths: list[int] | None = None) -> pd.DataFrame:
    n_layers, d_mlp = t["norm"].shape
    layer = np.repeat(np.arange(n_layers), d_mlp)
    neuron = np.tile(np.arange(d_mlp), n_layers)
    keep = neuron < np.repeat(np.asarray(widths if widths is not None else [d_mlp] * n_layers), d_mlp)
    layer, neuron = layer[keep], neuron[keep]
    flat = {name: t[name].reshape(n_layers * d_mlp, -1).numpy()[keep] for name in TENSORS[:4]}
    return pd.DataFrame({
        "layer": layer,
        "neuron": neuron,
        "id": ids if ids is not None else [f"{a}.{b}" for a, b in zip(layer.tolist(), neuron.tolist())],
        "norm": t["norm"].flatten().numpy()[keep],
        "mean": t["mean"].flatten().numpy()[keep],
        "std": t["std"].flatten().numpy()[keep],
        "top_tokens": list(strings[flat["top_ids"]]),
        "top_logits": list(flat["top_logits"]),
        "top_ids": list(flat["top_ids"]),
        "bottom_tokens": list(strings[flat["bottom_ids"]]),
        "bottom_logits": list(flat["bottom_logits"]),
        "bottom_ids": list(flat["bottom_ids"]),
    })


@torch.inference_mode()
def compute_projection(model: KVModel, *, k: int = 10, through_norm: bool = False, chunk_mb: float | None = 256,
                       layers=None, progress=None) -> dict[str, torch.Tensor]:
    """The projection tensors for ``layers`` (default all), without any caching.
    Per chunk: one matmul and two top-k on the device; results go to the CPU. The mean and std of a
    row v·W_U over the vocabulary come from W_U's moments instead of the [c, d_vocab] logits:
    mean = v·μ and E[x²] = vᵀ G v with μ = W_U.mean(1), G = W_U W_Uᵀ / d_vocab (float64; a fifth
    of the projection's time saved on CPU). Layers narrower than the widest are padded (ids 0, floats NaN)."""
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    d_vocab = model.d_vocab
    d_max = max((model.layers[layer].d_mlp for layer in layers), default=model.d_mlp)
    if not 1 <= k <= d_vocab:
        raise KvmemError(f"k must be between 1 and the vocabulary size {d_vocab}", param="k")
    c = chunk_rows(d_vocab, chunk_mb, d_max)
    defined = vocab_mask(model).to(model.device)
    n_defined = int(defined.sum())
    if k > n_defined:
        raise KvmemError(f"k must be between 1 and the number of ids the tokenizer defines ({n_defined})", param="k")
    W_U = model.W_U.to(torch.float32)  # [d_model, d_vocab]
    U64 = W_U[:, defined].double()  # moments over the defined ids only
    mu, gram = U64.mean(1), (U64 @ U64.T) / n_defined  # [d_model], [d_model, d_model]
    del U64
    out = {name: [] for name in TENSORS}
    for layer in layers:
        d_mlp = model.layers[layer].d_mlp
        parts = {name: [] for name in TENSORS[:6]}
        for start in range(0, d_mlp, c):
            v = value_matrix(model, layer, through_norm, slice(start, start + c))  # [c, d_model]
            logits = v @ W_U  # [c, d_vocab] float32
            top = logits.masked_fill(~defined, float("-inf")).topk(k, dim=1)
            bottom = logits.masked_fill_(~defined, float("inf")).topk(k, dim=1, largest=False)
            del logits
            v64 = v.double()
            mean64 = v64 @ mu
            std = ((v64 @ gram * v64).sum(1) - mean64 * mean64).clamp(min=0).sqrt().float()
            mean = mean64.float()
            for name, value in zip(TENSORS[:6], (top.indices, top.values, bottom.indices, bottom.values, mean, std)):
                parts[name].append(value.cpu())
        parts["norm"] = [model.value_norms(layer).cpu()]
        for name, chunks in parts.items():
            value = torch.cat(chunks)
            if value.shape[0] < d_max:  # a narrower layer: padded slots are no neuron
                pad = torch.full((d_max - value.shape[0], *value.shape[1:]), 0 if name.endswith("ids") else
                                 float("nan"), dtype=value.dtype)
                value = torch.cat([value, pad])
            out[name].append(value)
        if progress is not None:
            progress(layer)
    return {name: torch.stack(values) for name, values in out.items()}


def project_values(model: KVModel, *, k: int = 10, through_norm: bool = False, chunk_mb: float | None = 256,
                   cache: bool = True, progress=None) -> ValueProjection:
    """Every neuron's top-k and bottom-k tokens, for the whole model; cached on disk per model.
    ``result.table`` is the pandas DataFrame (one row per neuron), ``result["top_ids"]`` etc. the tensors."""
    fp = model.fingerprint()
    strings = vocab_strings(model)
    if cache:
        found = _find_cached(fp, model.dtype, through_norm, k)
        if found is not None:
            tensors, seconds, path, _ = found
            return ValueProjection(model.spec, fp, through_norm, k, tensors, strings, seconds, cached=True, path=path,
                                   ids=_ids(model), widths=_widths(model))
    t0 = time.perf_counter()
    tensors = compute_projection(model, k=k, through_norm=through_norm, chunk_mb=chunk_mb, progress=progress)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    proj = ValueProjection(model.spec, fp, through_norm, k, tensors, strings, seconds=time.perf_counter() - t0,
                           ids=_ids(model), widths=_widths(model))
    if cache:
        proj.path = _write_cache(proj, model)
    return proj


# --- cache ----------------------------------------------------------------------------------
def _cache_root() -> Path:
    from kvmem.models.load import cache_dir

    return cache_dir() / "vocab"


def _name(fp: str, dtype: torch.dtype, through_norm: bool, k: int) -> str:
    return f"{fp}-{str(dtype).removeprefix('torch.')}-{'norm' if through_norm else 'raw'}-k{k}"


def _find_cached(fp, dtype, through_norm, k):
    """(tensors sliced to k, seconds, path) from the smallest cached k' >= k, or None."""
    from safetensors.torch import load_file

    root = _cache_root()
    if not root.is_dir():
        return None
    prefix = _name(fp, dtype, through_norm, 0)[:-1]
    options = []
    for path in root.glob(prefix + "*"):
        suffix = path.name[len(prefix):]
        if suffix.isdigit() and int(suffix) >= k and (path / "manifest.json").is_file():
            options.append((int(suffix), path))
    for _, path in sorted(options):
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            if manifest.get("format") != FORMAT:
                continue
            t = load_file(str(path / "tensors.safetensors"))
        except (OSError, ValueError):
            continue
        for name in TENSORS[:4]:
            t[name] = t[name][..., :k].contiguous()
        for name in ("top_ids", "bottom_ids"):
            t[name] = t[name].long()
        return t, float(manifest.get("seconds", 0.0)), path, manifest.get("widths")
    return None


def cached_projection(model: str, fp: str, dtype: torch.dtype, through_norm: bool, k: int) -> ValueProjection | None:
    """The cached projection of the model with fingerprint ``fp``, without the model (no token strings; the
    layer widths from its manifest), or None when none is cached (or the cache cannot be read)."""
    try:
        found = _find_cached(fp, dtype, through_norm, k)
    except OSError:
        return None
    if found is None:
        return None
    tensors, seconds, path, widths = found
    return ValueProjection(model, fp, through_norm, k, tensors, strings=None, seconds=seconds, cached=True,
                           path=path, widths=widths)


def _write_cache(proj: ValueProjection, model) -> Path | None:
    """Write manifest, tensors and table as one folder (kvmem.atomic.staged: a kill leaves no half
    entry, an older entry is replaced only by a complete one); a read-only or full disk only costs speed."""
    from safetensors.torch import save_file

    from kvmem.atomic import staged

    target = _cache_root() / _name(proj.fingerprint, model.dtype, proj.through_norm, proj.k)
    manifest = {"format": FORMAT, "model": model.spec, "fingerprint": proj.fingerprint,
                "dtype": str(model.dtype).removeprefix("torch."), "through_norm": proj.through_norm, "k": proj.k,
                "n_layers": proj.n_layers, "d_mlp": proj.d_mlp, "widths": proj.widths, "d_vocab": model.d_vocab,
                "device": str(model.device), "seconds": proj.seconds, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        with staged(target, "vocab-cache") as tmp:
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            save_file({name: (t.to(torch.int32) if name.endswith("ids") else t).contiguous()
                       for name, t in proj.tensors.items()}, str(tmp / "tensors.safetensors"))
            proj.table.to_parquet(tmp / "table.parquet", index=False)
    except (OSError, KvmemError):  # KvmemError: a foreign NAME.partial sits in the cache
        return None
    return target


# --- a few neurons ----------------------------------------------------------------------------
@dataclass
class NeuronVocab:
    """What a few neurons' value vectors write (``kvmem vocab``)."""

    model: str
    through_norm: bool
    gated: bool
    note: str  # the sign caveat for gated FFNs, else ''
    neurons: pd.DataFrame  # id, layer, neuron, norm, mean, std, top_tokens, top_logits, bottom_tokens, ...

    def to_dict(self) -> dict:
        return {"model": self.model, "through_norm": self.through_norm, "gated": self.gated, "note": self.note,
                "neurons": self.neurons.to_dict(orient="records")}


def parse_neurons(model: KVModel, neurons) -> list[tuple[int, int]]:
    """'L.N' ('L.eE.N' / 'L.sS.N' at MoE layers) strings or (layer, index) pairs, checked against the model:
    (layer, index into the layer's d_mlp, flat at MoE layers) pairs."""
    from kvmem.neurons import parse_model_neuron

    pairs = [parse_model_neuron(model, n) for n in neurons]
    if not pairs:
        raise KvmemError("no neuron given: write one or more as LAYER.NEURON, e.g. 17.1234")
    return pairs


def neuron_vocab(model: KVModel, neurons, *, k: int = 10, through_norm: bool = False) -> NeuronVocab:
    """Top-k and bottom-k tokens of the given neurons' value vectors, computed directly
    (v_i·W_U in float32 for just these rows, undefined ids masked; no whole-model pass)."""
    pairs = parse_neurons(model, neurons)
    if not 1 <= k <= model.d_vocab:
        raise KvmemError(f"k must be between 1 and the vocabulary size {model.d_vocab}", param="k")
    logits = value_rows(model, pairs, through_norm=through_norm)  # [n, d_vocab] float32, -inf masked
    defined = vocab_mask(model).to(logits.device)
    if k > int(defined.sum()):
        raise KvmemError(f"k must be at most the number of ids the tokenizer defines ({int(defined.sum())})", param="k")
    top, bottom = logits.topk(k, dim=1), logits.masked_fill(~defined, float("inf")).topk(k, dim=1, largest=False)
    std, mean = torch.std_mean(logits[:, defined], dim=1, correction=0)
    strings = vocab_strings(model)
    from kvmem.neurons import neuron_name

    table = pd.DataFrame({
        "id": [neuron_name(model, a, b) for a, b in pairs],
        "layer": [a for a, _ in pairs],
        "neuron": [b for _, b in pairs],
        "norm": [model.value_norms(a)[b].item() for a, b in pairs],
        "mean": mean.cpu().tolist(),
        "std": std.cpu().tolist(),
        "top_tokens": [list(strings[row]) for row in top.indices.cpu().numpy()],
        "top_logits": top.values.cpu().tolist(),
        "top_ids": top.indices.cpu().tolist(),
        "bottom_tokens": [list(strings[row]) for row in bottom.indices.cpu().numpy()],
        "bottom_logits": bottom.values.cpu().tolist(),
        "bottom_ids": bottom.indices.cpu().tolist(),
    })
    return NeuronVocab(model.spec, through_norm, model.gated, GATED_NOTE if model.gated else "", table)
