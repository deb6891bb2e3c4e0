"""Which neurons write a given token: ``search(model, " Paris")``, the reverse index of the value projection.

Ranking. The raw logit v_i·W_U[:, t] favours value vectors with large norms that promote many
tokens at once, so each neuron is judged within its own projection row instead:
  1. neurons with t among the k tokens they promote most (known exactly from the whole-model
     projection, ``kvmem.vocab.project_values``) come first, by the rank of t in their row;
  2. the other neurons are screened by z-score z_i(t) = (v_i·W_U[:, t] - mean_i) / std_i, with mean_i
     and std_i of the neuron's row over the vocabulary (from the projection): one matvec per layer;
     the best max(4·top, 256) get their exact rank from their full rows, and all candidates are
     ordered by exact rank, then z.
Gated FFNs (SwiGLU, GeGLU) have negative coefficients about as often as positive ones, and a
neuron with m_i < 0 writes -v_i; so by default (``signs="auto"``) gated models are searched with
both signs (z(-v) = -z(v); t's rank in -v's row is its rank from the bottom of v's row) and the
``sign`` column says which one. ``suppress=True`` asks for the neurons (and signs) pushing t down.
The rank, logit and tokens shown for each listed neuron are recomputed from its full row.
A string that tokenizes to several tokens is searched for its first token (``note`` says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from kvmem.neurons import neuron_name
from kvmem.capture import check_layers
from kvmem.query import real_slots, stack_padded
from kvmem.errors import KvmemError
from kvmem.vocab import ValueProjection, project_values, value_matrix, vocab_strings

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel

SIGNS = ("auto", "both", "positive")
POOL = 256  # candidates whose exact rank is computed, at least


def _exact_ranks(model, pairs, sign, tid: int, suppress: bool, through_norm: bool, chunk_mb) -> np.ndarray:
    """The 1-based rank of token ``tid`` in each row sign·v_i·W_U (from the bottom with ``suppress``),
    computed from the full rows, a bounded chunk of rows at a time: [len(pairs)]."""
    from kvmem.vocab import chunk_rows

    c = chunk_rows(model.d_vocab, chunk_mb, len(pairs))
    out = []
    for start in range(0, len(pairs), c):
        rows = model.value_logits(pairs[start:start + c], through_norm=through_norm, sign=sign[start:start + c])
        col = rows[:, tid : tid + 1]
        out.append((((rows < col) if suppress else (rows > col)).sum(1) + 1).cpu())
    return torch.cat(out).numpy()


@dataclass
class SearchResult:
    model: str
    query: str
    token: str  # the token searched for
    token_id: int
    pieces: list[str]  # all tokens of the query string
    note: str  # '' or what was done with a multi-token query
    direction: str  # "promote" or "suppress"
    signs: list[int]  # value signs considered: [1] or [1, -1]
    through_norm: bool
    k: int  # ranks up to k are known for every neuron
    n_in_top_k: int  # (neuron, sign) pairs with the token among their k first (last, for suppress)
    # id, layer, neuron, sign (+1/-1: the row is sign·v_i), rank (of the token in sign·v_i's row, from the
    # top, or from the bottom for suppress), z and logit (the token's z-score and logit in that row),
    # norm (‖v_i‖), top_tokens / bottom_tokens (of sign·v_i)
    neurons: pd.DataFrame

    def to_dict(self) -> dict:
        d = {key: getattr(self, key) for key in ("model", "query", "token", "token_id", "pieces", "note", "direction",
                                                 "signs", "through_norm", "k", "n_in_top_k")}
        d["neurons"] = self.neurons.to_dict(orient="records")
        return d


def resolve_token(model: KVModel, text: str) -> tuple[int, list[str], str]:
    """(first token id, all token strings, note) for a query string."""
    if not text:
        raise KvmemError("the token is empty")
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise KvmemError(f"{text!r} gives no tokens")
    pieces = model.token_strings(ids)
    note = "" if len(ids) == 1 else (f"{text!r} is {len(ids)} tokens {pieces}; "
                                     f"searching for the first one, {pieces[0]!r}")
    return ids[0], pieces, note


def _rank_in(ids: torch.Tensor, token: int, k: int) -> torch.Tensor:
    """1-based position of ``token`` in each row of ids [..., k], or k+1 where absent."""
    hit = ids == token
    return torch.where(hit.any(-1), hit.int().argmax(-1) + 1, k + 1)


def search(model: KVModel, token: str, *, layers=None, top: int = 20, suppress: bool = False,
           through_norm: bool = False, signs: str = "auto", k: int = 10, projection: ValueProjection | None = None,
           chunk_mb: float | None = 256) -> SearchResult:
    """The neurons whose value vectors promote (or, with ``suppress``, push down) ``token`` most."""
    if signs not in SIGNS:
        raise KvmemError(f"signs must be one of {', '.join(SIGNS)}, not {signs!r}", param="signs")
    if top < 1:
        raise KvmemError("top must be at least 1", param="top")
    tid, pieces, note = resolve_token(model, token)
    layers = check_layers(model, layers)
    if projection is None:
        projection = project_values(model, k=k, through_norm=through_norm, chunk_mb=chunk_mb)
    elif projection.through_norm != through_norm or projection.n_layers != model.n_layers:
        raise KvmemError("the projection given does not match this model / through_norm setting")
    k = projection.k
    sign_list = [1, -1] if signs == "both" or (signs == "auto" and model.gated) else [1]
    if -1 in sign_list and through_norm and getattr(model.final_norm, "bias", None) is not None:
        raise KvmemError("searching -v through the final norm needs a norm without a bias: this model's norm adds "
                         "a bias, so norm(-v) is not -norm(v); use --signs positive or drop --through-norm")
    direction = -1 if suppress else 1

    with torch.inference_mode():
        u = model.W_U[:, tid]
        logit = stack_padded([(value_matrix(model, layer, through_norm) @ u).float().cpu() for layer in layers],
                             float("nan"))  # layers of different widths: padded slots are no neuron
    d_mlp = logit.shape[1]
    z = (logit - projection["mean"][layers, :d_mlp]) / projection["std"][layers, :d_mlp].clamp_min(1e-12)
    real = real_slots(model, layers, d_mlp)
    at_top = _rank_in(projection["top_ids"][layers, :d_mlp], tid, k).masked_fill(~real, k + 1)
    at_bottom = _rank_in(projection["bottom_ids"][layers, :d_mlp], tid, k).masked_fill(~real, k + 1)
    scores, ranks = [], []
    for s in sign_list:
        up = s * direction == 1  # the token should sit at the top of v's row
        scores.append((z if up else -z).masked_fill(~real, float("-inf")))
        ranks.append(at_top if up else at_bottom)
    score = torch.stack(scores).flatten().numpy()  # [n_signs * n_layers * d_mlp]
    rank = torch.stack(ranks).flatten().numpy()
    pool = np.lexsort((-score, rank))[:max(4 * top, POOL)]  # the known top-k hits, then the best z-scores
    pool = pool[np.tile(real.flatten().numpy(), len(sign_list))[pool]]  # never a padded slot
    n_layers = len(layers)
    sign_idx, rest = np.divmod(pool, n_layers * d_mlp)
    layer_idx, neuron = np.divmod(rest, d_mlp)
    pairs = [(layers[a], int(b)) for a, b in zip(layer_idx.tolist(), neuron.tolist())]
    sign = [sign_list[i] for i in sign_idx.tolist()]
    exact = _exact_ranks(model, pairs, sign, tid, suppress, through_norm, chunk_mb)
    best = np.lexsort((-score[pool], exact))[:top]
    pairs, sign, pool = [pairs[i] for i in best], [sign[i] for i in best], pool[best]

    rows = model.value_logits(pairs, through_norm=through_norm, sign=sign)  # [top, d_vocab], sign·v projected
    col = rows[:, tid : tid + 1]
    n_show = min(10, model.d_vocab)
    strings = vocab_strings(model)
    table = pd.DataFrame({
        "id": [neuron_name(model, a, b) for a, b in pairs],
        "layer": [a for a, _ in pairs],
        "neuron": [b for _, b in pairs],
        "sign": sign,
        "rank": exact[best].tolist(),
        "z": (score[pool] * direction).tolist(),
        "logit": col[:, 0].cpu().tolist(),
        "norm": [model.value_norms(a)[b].item() for a, b in pairs],
        "top_tokens": [list(strings[r]) for r in rows.topk(n_show, dim=1).indices.cpu().numpy()],
        "bottom_tokens": [list(strings[r]) for r in rows.topk(n_show, dim=1, largest=False).indices.cpu().numpy()],
    })
    return SearchResult(model.spec, token, model.token_strings([tid])[0], int(tid), pieces, note,
                        "suppress" if suppress else "promote", sign_list, through_norm, k,
                        int((rank <= k).sum()), table)


from kvmem.callable_module import make_callable  # noqa: E402

make_callable(__name__)  # kvmem.search(...) calls search(); `import kvmem.search` stays the module
