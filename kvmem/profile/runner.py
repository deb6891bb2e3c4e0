"""The profiling pass: stream the token store through the model once, updating LayerStats per layer.

Rows follow the run's RowLayout (kvmem.profile.tokens: by default every row inside one document, the
tokenizer's BOS first, row position 0 left out of the statistics). Rows are scheduled deterministically
(``schedule``): the full rows in stream order, ``batch_size`` at a time, then the short last rows of the
documents longest first, so that rows of similar length share a padded batch (padding: 2.6% of the
model positions over the default corpus with SmolLM2's tokenizer at seq_len 512, 8 rows per batch). Per batch [b, L]: one forward pass with its attention mask that stops
after the last profiled layer (no LM head), coefficient hooks hand each layer's m at the counted
positions [N, d_mlp] (and gate/up for gated FFNs) straight to that layer's statistics (in stream order
within the batch), and nothing is kept beyond them (with ``context`` on, the statistics
include the m of the shown examples' context windows, taken while their tokens are in the batch:
kvmem.stats.context). Checkpoints (stats state + next row) are
written every ``checkpoint_every`` seconds at batch boundaries, so ``--resume`` continues with the
same batches and ends bit-identical to an uninterrupted run (``next_row`` counts scheduled rows).

Host synchronisation: on a GPU the statistics take their sync-free path (LayerStats(sync_free=True):
nothing inside the forward hooks reads a value back to the host; input checks are raised at batch
boundaries). What syncs is outside the batch loop's device work: each batch's host-side inputs (which
positions count, their token and document ids) are built on the host before the forward pass and copied
from pinned memory with ``non_blocking=True``, one batch ahead; the progress bar (host-side lengths only)
and checkpoints (the state read back) run at batch boundaries. ``HOOK_GUARD`` wraps every hook's work (the
tests set kvmem.stats.syncguard.no_host_sync there).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvmem import tuning
from kvmem.capture import capture, check_layers
from kvmem.errors import KvmemError
from kvmem.models.load import DEFAULT_MODEL
from kvmem.profile import moe
from kvmem.profile import run as runfiles
from kvmem.profile.corpus import DEFAULT_CORPUS
from kvmem.profile.tokens import RowLayout, TokenStore
from kvmem.stats import placement
from kvmem.stats.routing import Router

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel


SYNC_FREE: bool | None = None  # LayerStats(sync_free=...): None = on unless the device is the CPU
HOOK_GUARD = contextlib.nullcontext  # a context manager around each hook's work (tests: no_host_sync)


@dataclass(frozen=True)
class ProfileConfig:
    model: str = DEFAULT_MODEL  # model spec (see kvmem.load)
    corpus: str = DEFAULT_CORPUS  # corpus source (see kvmem.profile.corpus)
    text_field: str = "text"  # field/column holding the text in .jsonl/.parquet/hf corpora
    tokens: int | None = None  # stop after this many tokens (None: the whole corpus)
    seq_len: int = 512  # tokens per model input row, the BOS included
    rows: str = "doc"  # "doc": rows inside one document, BOS first where the tokenizer has one; "stream": the
    #                    legacy cut of the flat stream into seq_len rows across documents, no BOS
    skip_first: bool = True  # leave row position 0 out of the statistics (matters in rows without a BOS: the BOS,
    #                          not a corpus token, never enters them)
    bos: str = "auto"  # the token opening every document row: auto (the tokenizer's bos_token), none, or a token
    #                    string of the vocabulary (e.g. "<|endoftext|>")
    batch_size: int | None = None  # rows per forward pass (None: auto, backing off on out-of-memory)
    layers: tuple[int, ...] | None = None  # layers to profile (None: all)
    top_k: int = 20  # examples kept per neuron in each top-k store
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16
    checkpoint_every: float = 300.0  # seconds between checkpoints (0: after every batch)
    shard: str | None = None  # "i/n": profile only the i-th of n contiguous blocks of rows (merge them later)
    cpu_tuning: bool = True  # on CPU: torch's OpenMP team for the stats kernel, glibc kept buffers (kvmem.tuning)
    compile: bool = False  # torch.compile the sync-free statistics update (GPU runs; kvmem.stats.layer)
    device_map: str | None = None  # "auto": the model spread over the visible GPUs by accelerate, each layer's
    #                                statistics on its layer's GPU (kvmem.stats.placement); None: one device
    # context windows kept for the report (kvmem.stats.context): m of each shown example's neuron over its
    # context, so `kvmem report` shades contexts without re-running the model. Defaults = ReportOptions'.
    context: bool = True  # keep them at all
    context_before: int = 10  # tokens before the example's token
    context_after: int = 4  # tokens after it
    context_top: int = 10  # for the first N slots of the top store (the sample and quadrant examples: all)
    context_docs: int = 5  # ... of the per-document store
    context_bottom: int = 5  # ... of the bottom store
    context_dtype: str = "bfloat16"  # their values: bfloat16 (GPU runs compute m in it), float16 or float32

    def validate(self) -> "ProfileConfig":
        for name in ("seq_len", "top_k"):
            if getattr(self, name) < 1:
                raise KvmemError(f"{name} must be at least 1", param=name)
        for name in CONTEXT_FIELDS[1:-1]:
            if getattr(self, name) < 0:
                raise KvmemError(f"{name} must be at least 0")
        if self.context_dtype not in CONTEXT_DTYPES:
            raise KvmemError(f"context_dtype must be one of {', '.join(CONTEXT_DTYPES)} (got {self.context_dtype!r})")
        if self.tokens is not None and self.tokens < 1:
            raise KvmemError("tokens must be at least 1", param="tokens")
        if self.batch_size is not None and self.batch_size < 1:
            raise KvmemError("batch_size must be at least 1", param="batch_size")
        if self.device_map not in (None, "auto"):
            raise KvmemError(f"device_map must be auto (got {self.device_map!r})", param="device_map")
        if self.rows not in ROWS:
            raise KvmemError(f"rows must be one of {', '.join(ROWS)} (got {self.rows!r})", param="rows")
        if self.shard is not None:
            parse_shard(self.shard)
        return self


CONTEXT_FIELDS = ("context", "context_before", "context_after", "context_top", "context_docs", "context_bottom",
                  "context_dtype")
CONTEXT_DTYPES = ("bfloat16", "float16", "float32")
ROWS = ("doc", "stream")
LAYOUT_FIELDS = ("rows", "skip_first", "bos")  # settings that decide the rows (with seq_len and the tokenizer's BOS)


def bos_id(model: KVModel, cfg: ProfileConfig) -> int | None:
    """The BOS prepended to every row (document rows only; stream rows have none): with ``bos`` auto the
    tokenizer's ``bos_token_id`` (None if it defines none), none, or the id of the token string given."""
    if cfg.rows != "doc" or cfg.bos == "none":
        return None
    tok = model.tokenizer
    if cfg.bos == "auto":
        bos = getattr(tok, "bos_token_id", None)
        return None if bos is None else int(bos)
    ids = tok.convert_tokens_to_ids([cfg.bos])
    if not ids or ids[0] is None or (ids[0] == tok.unk_token_id and cfg.bos != tok.unk_token):
        raise KvmemError(f"--bos {cfg.bos!r} is not a token of the model's vocabulary")
    return int(ids[0])


def layout_of(model: KVModel, cfg: ProfileConfig, store: TokenStore) -> RowLayout:
    """The RowLayout ``cfg`` gives ``store`` with this model's tokenizer (pad: its pad, else eos, else BOS id)."""
    tok = model.tokenizer
    pad = next((int(x) for x in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None))
                if x is not None), None)
    return RowLayout.build(store, cfg.seq_len, bos_id(model, cfg), cfg.rows == "doc", cfg.skip_first, pad)


def schedule(layout: RowLayout, batch_size: int) -> list[torch.Tensor]:
    """The batches of rows, deterministic (row numbers [b] int64 ascending in each, b <= batch_size): the
    full rows in stream order, then the shorter rows by length, longest first (ties in stream order), so
    that a padded batch holds rows of similar length. A row's m depends on its batch-mates only through
    float rounding (padding width and batch shape); with batch_size 1 every row runs alone, unpadded."""
    full_len = layout.seq_len - layout.first
    full = (layout.lengths == full_len).nonzero().squeeze(1)
    short = (layout.lengths < full_len).nonzero().squeeze(1)
    order = short[torch.sort(-layout.lengths[short], stable=True).indices]
    out = [full[i:i + batch_size] for i in range(0, full.numel(), batch_size)]
    return out + [torch.sort(order[i:i + batch_size]).values for i in range(0, order.numel(), batch_size)]


def padding_share(layout: RowLayout, batch_size: int) -> dict:
    """Model positions of ``schedule``'s batches: store tokens, BOS and padding, and padding's share."""
    tokens, positions = int(layout.lengths.sum()), 0
    for rows in schedule(layout, batch_size):
        positions += rows.numel() * (int(layout.lengths[rows].max()) + layout.first)
    bos = layout.n_rows * layout.first
    return {"positions": positions, "tokens": tokens, "bos": bos, "padding": positions - tokens - bos,
            "padding_share": (positions - tokens - bos) / positions if positions else 0.0}


def parse_shard(text: str) -> tuple[int, int]:
    """'1/4' -> (1, 4)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise KvmemError(f"malformed --shard {text!r}: write I/N, e.g. 0/2") from None
    if not (n >= 1 and 0 <= i < n):
        raise KvmemError(f"--shard {text}: need 0 <= I < N")
    return i, n


def shard_of(store: TokenStore, layout: RowLayout, i: int, n: int) -> TokenStore:
    """The i-th of n contiguous blocks of the layout's rows (global indices kept; the shard's own layout,
    built with the same settings, has exactly those rows)."""
    rows = layout.n_rows
    a, b = rows * i // n, rows * (i + 1) // n
    if a >= b:
        raise KvmemError(f"--shard {i}/{n}: the stream has only {rows} rows")
    lo = int(layout.starts[a]) - store.offset
    hi = int(layout.starts[b]) - store.offset if b < rows else store.n_tokens
    return store.slice_tokens(lo, hi)


@dataclass
class Step:
    """One batch as the profiler runs it (axes: b rows, L positions, N counted positions)."""

    ids: torch.Tensor  # [b, L] int64 model input (RowBatch.ids)
    mask: torch.Tensor  # [b, L] bool attention mask
    sel: torch.Tensor | None  # [N] int64 flat positions (of b*L) that enter the statistics; None: all of them
    index: torch.Tensor  # [N] int64 their global token indices, increasing
    doc: torch.Tensor  # [N] int64 their global document ids (TokenStore.doc_of)
    pos: torch.Tensor  # [N] int64 their positions in the row


@dataclass
class Progress:
    next_row: int = 0
    elapsed: float = 0.0  # seconds spent in earlier sessions of this run


# activations with act(g)·g >= 0 and act(g) != 0 for g != 0 (up to underflow): kvmem.stats.base.LayerSpec
SIGN_PRESERVING_ACTS = frozenset({"silu", "swish", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu"})


def sign_preserving(model: KVModel) -> bool:
    """Whether the model's FFN activation keeps its input's sign (only the known names; anything else: no)."""
    try:
        return str(model.activation) in SIGN_PRESERVING_ACTS
    except Exception:  # an adapter without a named activation
        return False


def context_windows(model: KVModel, cfg: ProfileConfig, device=None, d_mlp: int | None = None):
    """A layer's ContextWindows for the settings of ``cfg`` (None when ``cfg.context`` is off); d_mlp: the
    layer's width (default the model's)."""
    from kvmem.stats.context import DTYPES, ContextWindows

    if not cfg.context:
        return None
    return ContextWindows(model.d_mlp if d_mlp is None else d_mlp, before=cfg.context_before, after=cfg.context_after,
                          n_top=cfg.context_top,
                          n_docs=cfg.context_docs, n_bottom=cfg.context_bottom, dtype=DTYPES[cfg.context_dtype],
                          device=model.device if device is None else device)


# bytes per (token, neuron) of one layer's sync-free update at its peak (int64 keys of m, of -m and of the
# documents' best, the sample's keys and priorities, the histogram's int32 codes, float64 moments, float32
# m and positives): an upper estimate, so that half the free memory holds a batch's statistics transients
STATS_BYTES_PER_ENTRY = 64
GPU_TOKENS = (1024, 32768)  # the range of tokens per batch the free-memory rule picks from


def auto_batch_size(model: KVModel, seq_len: int) -> int:
    """Rows per batch. On a GPU from the free memory (torch.cuda.mem_get_info, read once before the pass):
    half of it over STATS_BYTES_PER_ENTRY * d_mlp bytes per token, within GPU_TOKENS (the caller backs off
    on out-of-memory: find_batch_size, Profiler.run_batch). On CPU 4k tokens (the statistics' fixed costs
    per call, thread launches and per-block set-up, spread over more tokens; the forward pass runs as fast
    as with 2k)."""
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        target = int(free // 2 // (STATS_BYTES_PER_ENTRY * model.d_mlp))
        target = min(max(target, GPU_TOKENS[0]), GPU_TOKENS[1])
    else:
        target = 4096
    return max(1, target // seq_len)


class Profiler:
    """One profiling job over a token store (or a shard of it). ``run()`` returns the stats."""

    def __init__(self, model, cfg: ProfileConfig, store: TokenStore, out: Path, *, progress=None):
        self.model, self.cfg, self.store, self.out = model, cfg, store, out
        self.layers = check_layers(model, cfg.layers)
        self.progress = progress
        # value norms ‖v_i‖ weigh |m_i| in what each neuron writes (kvmem.stats.mass)
        self.layout = layout_of(model, cfg, store)
        # each layer's statistics on that layer's device (one device, or spread by --device-map auto)
        self.devices = placement.layer_devices(model, self.layers)
        self.moe = moe.moe_layers(model, self.layers)  # mixture-of-experts layers (kvmem.profile.moe)
        self.stats = {layer: self.layer_stats(layer) for layer in self.layers}
        self.state = Progress()
        self.tuning = tuning.state()  # what kvmem.tuning has in effect (set by run() on CPU)
        self.batch_size = cfg.batch_size or auto_batch_size(model, cfg.seq_len)
        self.plan = schedule(self.layout, self.batch_size)
        self.what = ("coef", "gate", "pre") if model.gated else ("coef",)
        self.split = 1  # each planned batch runs in this many parts (doubled on out-of-memory: run_batch)
        self.backoffs = 0  # out-of-memory back-offs taken
        self.skip: frozenset = frozenset()  # layers the current step leaves out (they took the batch already)
        self.done: set | None = None  # layers whose update of the current step completed

    def layer_stats(self, layer: int):
        """Fresh statistics of one layer. MoE layers: raw m of the flat expert neurons (not gated: gate and
        up are not captured for experts), the routing, no mass-L0 (raw m does not carry the routing weight
        that scales what a neuron writes)."""
        from kvmem.stats import LayerStats

        model, cfg, dev = self.model, self.cfg, self.devices[layer]
        common = dict(k=cfg.top_k, max_pos=cfg.seq_len, device=dev, sync_free=SYNC_FREE, compile=cfg.compile)
        if layer in self.moe:
            layout = moe.layout_of(model, layer)
            d = layout.n_experts * layout.d_expert + layout.n_shared * layout.d_shared
            return LayerStats(d, context=context_windows(model, cfg, dev, d), n_experts=layout.n_experts,
                              expert_of=moe.expert_of(layout), **common)
        d = moe.layer_width(model, layer)
        return LayerStats(d, gated=model.layers[layer].gated, context=context_windows(model, cfg, dev, d),
                          value_norm=model.value_norms(layer), sign_preserving_act=sign_preserving(model), **common)

    # --- checkpoints ----------------------------------------------------------------------
    @property
    def ckpt(self) -> Path:
        return self.out / "checkpoint"

    def save_checkpoint(self, elapsed: float) -> None:
        """The state goes to a file named by its row, then progress.json (atomic) points at it: a kill
        at any moment leaves progress.json and the state it names in agreement."""
        name = f"stats-{self.state.next_row}.safetensors"
        runfiles.save_stats(self.ckpt / name, self.stats)
        runfiles.write_json(self.ckpt / "progress.json", {
            "next_row": self.state.next_row, "elapsed": elapsed, "batch_size": self.batch_size,
            "stats_file": name, "config": asdict(self.cfg) | {"layers": self.layers}})
        for old in self.ckpt.glob("stats-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def load_checkpoint(self) -> None:
        progress = json.loads((self.ckpt / "progress.json").read_text())
        saved = progress["config"]
        mine = asdict(self.cfg) | {"layers": self.layers}
        for key in ("model", "corpus", "text_field", "tokens", "seq_len", "layers", "top_k", "shard") + LAYOUT_FIELDS \
                + CONTEXT_FIELDS:
            if saved.get(key) != (list(mine[key]) if isinstance(mine[key], tuple) else mine[key]):
                raise KvmemError(f"--resume: the checkpoint was made with {key}={saved.get(key)!r}, not {mine[key]!r}")
        self.batch_size = progress["batch_size"]  # same batches -> bit-identical statistics
        self.plan = schedule(self.layout, self.batch_size)
        self.stats = runfiles.load_stats(self.ckpt / progress["stats_file"], device=self.model.device)
        self.stats = {layer: s if s.device == self.devices[layer] else
                      type(s).from_state_dict(s.state_dict(), device=self.devices[layer]) for layer, s in self.stats.items()}
        self.state = Progress(progress["next_row"], progress["elapsed"])

    # --- the pass -------------------------------------------------------------------------
    def batches(self):
        """(rows [b] int64, Step) of the schedule from state.next_row on; what enters the statistics is
        worked out on the host, then moved (no host synchronisation on a GPU): from pinned memory with
        ``non_blocking=True`` on CUDA, one batch ahead (batch i + 1 is built and its copy queued before batch
        i is handed out). On CPU the same code, the move a no-op."""
        pending = None
        for rows, step in self.host_batches():
            step = self.to_device(step)
            if pending is not None:
                yield pending
            pending = (rows, step)
        if pending is not None:
            yield pending

    def to_device(self, step: "Step") -> "Step":
        """A host-built Step on the model's device (CUDA: pinned, non_blocking; CPU: as it is)."""
        if self.model.device.type != "cuda":
            return step
        return Step(*(None if t is None else t.pin_memory().to(self.model.device, non_blocking=True)
                      for t in (step.ids, step.mask, step.sel, step.index, step.doc, step.pos)))

    def host_batches(self):
        """(rows, Step on the host) of the schedule from state.next_row on."""
        done = 0
        for rows in self.plan:
            done += rows.numel()
            if done <= self.state.next_row:
                continue
            yield rows, self.host_step(rows)

    def host_step(self, rows: torch.Tensor) -> "Step":
        """The Step of a batch of rows [b] int64, built on the host."""
        b = self.layout.batch(self.store, rows)
        flat = b.counted.flatten()
        sel = None if bool(flat.all()) else flat.nonzero().squeeze(1)  # None: every position counts
        index = b.index.flatten() if sel is None else b.index.flatten().index_select(0, sel)
        pos = b.pos.flatten() if sel is None else b.pos.flatten().index_select(0, sel)
        return Step(b.ids, b.mask, sel, index, self.store.doc_of(index), pos)

    def run_batch(self, rows: torch.Tensor, b: "Step", skip=frozenset()) -> None:
        """step, backing off on out-of-memory: the batch is retried as two halves of its rows (and so on
        down to one row), each layer that already took the whole batch left out of the retries, so nothing
        is lost or counted twice (a failed sync-free LayerStats.update leaves its state as it was; the CPU
        paths are not undone, and on CPU an OOM is not expected). Later batches of the same plan are cut
        into as many parts (``split``), so the plan, the checkpoints and ``next_row`` stay as they were."""
        split = min(self.split, rows.numel())
        if split > 1:
            for part in torch.tensor_split(rows, split):
                self._attempt(part, self.to_device(self.host_step(part)), skip)
        else:
            self._attempt(rows, b, skip)

    def _attempt(self, rows: torch.Tensor, b: "Step", skip) -> None:
        done: set = set()
        self.skip, self.done = skip, done
        try:
            self.step(rows, b)
        except torch.OutOfMemoryError:
            if rows.numel() == 1:
                raise KvmemError("out of GPU memory even with one row per batch: lower --seq-len or --layers") from None
            del b
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()
            half = -(-rows.numel() // 2)  # the larger half's rows: later batches run in parts of at most that
            self.split = max(self.split, -(-self.batch_size // half))
            self.backoffs += 1
            for part in torch.tensor_split(rows, 2):
                self._attempt(part, self.to_device(self.host_step(part)), skip | done)

    def done_tokens(self) -> int:
        """Store tokens of the scheduled rows before state.next_row."""
        done, n = 0, 0
        for rows in self.plan:
            if done + rows.numel() > self.state.next_row:
                break
            done += rows.numel()
            n += int(self.layout.lengths[rows].sum())
        return n

    def step(self, rows: torch.Tensor, b: "Step") -> None:
        """One forward pass over a batch of rows; the counted positions (in stream order) update the statistics
        of every layer but those in ``self.skip``; each layer whose update completed is added to ``self.done``
        (both set by run_batch)."""
        sel, skip, done = b.sel, self.skip, self.done

        def on_layer(layer, t):
            if layer in skip:
                return
            with HOOK_GUARD():
                if layer in self.moe:  # the family's routing rule, from the logits as the forward saw them
                    t["idx"], t["weight"] = moe.route(self.model, layer, t["logits"], t.pop("x"))
                flat = {k: v.reshape(-1, v.shape[-1]) for k, v in t.items()}
                if sel is not None:
                    flat = {k: v.index_select(0, sel) for k, v in flat.items()}
                router = Router(flat["logits"], flat["idx"], flat["weight"]) if layer in self.moe else None
                self.stats[layer].update(flat["coef"], b.index, b.doc, b.pos, gate=flat.get("gate"),
                                         up=flat.get("pre"), router=router)
            if done is not None:
                done.add(layer)

        # dense models: kvmem.capture; with MoE layers one capture over both kinds (kvmem.profile.moe)
        cap = (moe.capture_layers(self.model, self.layers, self.what, on_layer=on_layer) if self.moe else
               capture(self.model, self.layers, self.what, stop=True, on_layer=on_layer))
        with torch.inference_mode(), cap:
            self.model.hf(input_ids=b.ids, attention_mask=b.mask, use_cache=False)

    def run(self) -> float:
        """Process every remaining batch; returns the total seconds spent (over all sessions)."""
        if self.model.device.type == "cpu":
            self.tuning = tuning.apply(self.cfg.cpu_tuning)  # process-wide; kvmem.tuning has the switch
        start, last_ckpt = time.monotonic(), time.monotonic()
        for rows, b in self.batches():
            self.run_batch(rows, b)
            self.state.next_row += rows.numel()
            if self.progress is not None:
                self.progress(int(self.layout.lengths[rows.cpu()].sum()))
            if time.monotonic() - last_ckpt >= self.cfg.checkpoint_every:
                self.save_checkpoint(self.state.elapsed + time.monotonic() - start)
                last_ckpt = time.monotonic()
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        for s in self.stats.values():  # the sync-free path's deferred input checks
            s.check()
        return self.state.elapsed + time.monotonic() - start


def find_batch_size(model: KVModel, cfg: ProfileConfig, store: TokenStore, out: Path) -> int:
    """Largest rows-per-batch (from the auto guess down) whose forward pass and statistics update
    fit in GPU memory, probed on throw-away statistics. On CPU the guess is used as is."""
    guess = auto_batch_size(model, cfg.seq_len)
    if model.device.type != "cuda" or cfg.batch_size:
        return cfg.batch_size or guess
    rows = min(guess, max(1, store.n_tokens // cfg.seq_len))
    while True:
        probe = Profiler(model, replace(cfg, batch_size=rows), store, out)
        try:
            first, b = next(probe.batches())
            probe.step(first, b)
            return rows
        except torch.OutOfMemoryError:
            del probe
            torch.cuda.empty_cache()
            if rows == 1:
                raise KvmemError("out of GPU memory even with one row per batch: lower --seq-len or --layers")
            rows //= 2


def remove_checkpoint(out: Path) -> None:
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
