"""The uniform key-value view of one FFN layer, and the adapter protocol.

Orientation, the same for every family (adapters absorb storage quirks):
  W_in, W_gate  [d_model, d_mlp]   (W_in is the up projection of gated FFNs)
  W_out         [d_mlp, d_model]   (row i is neuron i's value vector)
  W_U           [d_model, d_vocab]

The coefficient vector m [batch, pos, d_mlp] is the input of ``out_module``:
  m = act(x·W_in + b_in)                         (GPT-2, NeoX, OPT, GPT-J, Falcon, StarCoder2, ...)
  m = act(x·W_gate + b_gate) ⊙ (x·W_in + b_in)   (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, ...)
and the FFN output is y = m·W_out + b_out [batch, pos, d_model].

What the layer writes into the residual stream (``FFNLayer.write``):
  pre-norm and parallel blocks   write_scale · y                     (write_scale: Granite's residual_multiplier)
  post-FFN norm (Gemma 2/3, OLMo 2)  write_scale · N(y), N an RMSNorm: Σ_i m_i·(γ⊙v_i)·s + s·γ⊙b_out
  post-residual norm (OPT-350m)  the new stream N(r + y), N a LayerNorm: Σ_i m_i·γ⊙(v_i − mean v_i)·s + rest
with s [batch, pos, 1] the token's norm scale (1/rms or 1/σ of the norm's input, eps included). Once s
is fixed the map is linear, so the decomposition over neurons is exact and additive per token; γ is the
effective gain (1 + w for Gemma's RMSNorm). ``value_vectors_written()`` are the w_i = write_scale·γ⊙v_i
(centred for a LayerNorm) to project into the vocabulary.

Gemma-3 style scales outside the FFN (embedding scale, logit soft-capping or scaling) are the adapter's:
``Adapter.embedding_scale``, ``Adapter.logit_transform``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from kvmem.errors import KvmemError
from kvmem.models.fields import check_fields
from kvmem.models.norms import NORM_KINDS, norm_bias, norm_gain, norm_inv_scale


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of an nn.Linear-like module as [in, out] (a view, no copy)."""
    if isinstance(module, nn.Linear):
        return module.weight.T
    # transformers' Conv1D (GPT-2) stores [in, out] already.
    if type(module).__name__ == "Conv1D":
        return module.weight
    raise KvmemError(f"kvmem cannot read weights of a {type(module).__name__} module")


@dataclass(frozen=True)
class FFNLayer:
    """One FFN layer seen as a key-value memory. Tensors are views of the model's weights."""

    index: int
    in_module: nn.Module  # produces x·W_in + b_in; its input is the FFN input x [.., d_model]
    gate_module: nn.Module | None  # produces x·W_gate + b_gate (gated FFNs only)
    out_module: nn.Module  # its input is the coefficient vector m [.., d_mlp]
    act: Callable[[torch.Tensor], torch.Tensor]
    ffn_module: nn.Module  # its output is the FFN's output (m·W_out + b_out) [.., d_model]
    post_norm: nn.Module | None = None  # the norm between the FFN output and the residual stream, if any
    post_norm_kind: str = ""  # "rms" (w·z/rms), "rms1p" ((1+w)·z/rms, Gemma), "layer" (LayerNorm)
    post_norm_reads_residual: bool = False  # True: the norm reads r + y (OPT post-LN), not y alone
    write_scale: float = 1.0  # the block adds write_scale·(FFN output) (Granite's residual_multiplier)
    fused_gate_up: bool = False  # in_module is gate_module, one Linear giving [gate | up] (Phi-3)
    out_mutated: bool = False  # the block edits the FFN output tensor in place afterwards (Falcon adds
    #                            attention into it): readers of ffn_module's output must clone it

    def __post_init__(self):
        if self.post_norm is not None and self.post_norm_kind not in NORM_KINDS:
            raise KvmemError(f"layer {self.index}: unknown post_norm_kind {self.post_norm_kind!r}")

    @property
    def gated(self) -> bool:
        return self.gate_module is not None

    @property
    def W_in(self) -> torch.Tensor:
        W = linear_weight(self.in_module)
        return W[:, W.shape[1] // 2:] if self.fused_gate_up else W

    @property
    def W_gate(self) -> torch.Tensor | None:
        if self.gate_module is None:
            return None
        W = linear_weight(self.gate_module)
        return W[:, :W.shape[1] // 2] if self.fused_gate_up else W

    def split_gate_up(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, up) halves of the fused module's output [..., 2·d_mlp] (Phi-3: gate first); views."""
        half = t.shape[-1] // 2
        return t[..., :half], t[..., half:]

    def pre_of(self, in_output: torch.Tensor) -> torch.Tensor:
        """x·W_in + b_in [..., d_mlp] from in_module's output (its second half when gate and up are fused)."""
        return self.split_gate_up(in_output)[1] if self.fused_gate_up else in_output

    def gate_of(self, gate_output: torch.Tensor) -> torch.Tensor:
        """x·W_gate + b_gate [..., d_mlp] from gate_module's output (its first half when fused)."""
        return self.split_gate_up(gate_output)[0] if self.fused_gate_up else gate_output

    @property
    def W_out(self) -> torch.Tensor:
        return linear_weight(self.out_module)

    @property
    def b_in(self) -> torch.Tensor | None:
        b = getattr(self.in_module, "bias", None)
        return self.pre_of(b) if b is not None else None

    @property
    def b_gate(self) -> torch.Tensor | None:
        b = None if self.gate_module is None else getattr(self.gate_module, "bias", None)
        return self.gate_of(b) if b is not None else None

    @property
    def b_out(self) -> torch.Tensor | None:
        return getattr(self.out_module, "bias", None)

    @property
    def d_mlp(self) -> int:
        return self.W_out.shape[0]

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """m from the FFN input x [..., d_model], computed from the weights: [..., d_mlp]."""
        pre = _affine(x, self.W_in, self.b_in)
        if self.gate_module is None:
            return self.act(pre)
        return self.act(_affine(x, self.W_gate, self.b_gate)) * pre

    def output(self, m: torch.Tensor) -> torch.Tensor:
        """The FFN output m·W_out + b_out: [..., d_model]."""
        return _affine(m, self.W_out, self.b_out)

    # --- what the layer writes into the residual stream (see the module docstring) -------
    def norm_scale(self, y: torch.Tensor, resid: torch.Tensor | None = None) -> torch.Tensor:
        """s [..., 1] float32: the post-norm's per-token scale (1/rms(y), or 1/σ(r + y) when the norm reads
        the residual, eps included); ones without a post-norm. y: the FFN output [..., d_model]; resid: the
        stream the FFN output is added to (needed only when ``post_norm_reads_residual``)."""
        if self.post_norm is None:
            return torch.ones(*y.shape[:-1], 1, device=y.device)
        z = y.float()
        if self.post_norm_reads_residual:
            if resid is None:
                raise KvmemError(f"layer {self.index}: its post-norm reads the residual stream; pass resid")
            z = z + resid.float()
        return norm_inv_scale(self.post_norm, self.post_norm_kind, z)

    def _gain(self) -> torch.Tensor | None:
        return None if self.post_norm is None else norm_gain(self.post_norm, self.post_norm_kind)

    def _center(self, v: torch.Tensor) -> torch.Tensor:
        return v - v.mean(-1, keepdim=True) if self.post_norm_kind == "layer" else v

    def value_vectors_written(self) -> torch.Tensor:
        """w_i [d_mlp, d_model] float32: write_scale·γ⊙v_i (v_i centred under a LayerNorm), so that neuron i
        writes m_i·w_i·s; equal to write_scale·v_i without a post-norm. Project these into the vocabulary."""
        W = self.W_out.float()
        g = self._gain()
        if g is not None:
            W = self._center(W) * g
        return W * self.write_scale

    def written(self, m: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_i m_i·w_i·s [..., d_model] float32: what the neurons with coefficients m [..., d_mlp] write (zero
        the others' entries of m to select a set). ``scale`` s [..., 1] from ``norm_scale``, required with a
        post-norm (it depends on the whole token, not on the selected neurons)."""
        if scale is None:
            if self.post_norm is not None:
                raise KvmemError(f"layer {self.index} has a post-FFN norm: pass the token's scale (norm_scale)")
            scale = 1.0
        return (m.float() @ self.value_vectors_written()) * scale

    def written_rest(self, scale: torch.Tensor | None = None, resid: torch.Tensor | None = None) -> torch.Tensor:
        """Everything the layer writes besides the neurons [..., d_model] float32: b_out (through the norm), the
        norm's bias, and under a residual-reading norm the renormalised stream s·γ⊙centre(r) (resid needed)."""
        b = self.b_out.float() if self.b_out is not None else torch.zeros(self.W_out.shape[1], device=self.W_out.device)
        if self.post_norm is None:
            return b * self.write_scale * (1.0 if scale is None else torch.ones_like(scale))
        z = b if not self.post_norm_reads_residual else b + resid.float()
        out = self._center(z) * self._gain() * scale
        beta = norm_bias(self.post_norm)
        if beta is not None:
            out = out + beta
        return out * self.write_scale

    def written_by(self, m: torch.Tensor, neurons, y: torch.Tensor | None = None,
                   resid: torch.Tensor | None = None) -> torch.Tensor:
        """What the neurons ``neurons`` (indices or a bool mask over d_mlp) write [..., d_model] float32, given the
        token's full coefficients m [..., d_mlp]: Σ_{i in neurons} m_i·w_i·s with s from the whole FFN output
        y (= output(m) when not given) and, under a residual-reading norm, the stream resid."""
        keep = torch.zeros(m.shape[-1], dtype=torch.bool, device=m.device)
        keep[torch.as_tensor(neurons, device=m.device)] = True
        s = None
        if self.post_norm is not None:
            s = self.norm_scale(self.output(m) if y is None else y, resid)
        return self.written(m * keep, s)

    def write(self, m: torch.Tensor, y: torch.Tensor | None = None, resid: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's whole write [..., d_model] float32 from its coefficients m (y = output(m) when not given):
        written(m, s) + written_rest(s). Equals resid.post − (stream before the FFN) for pre-norm, parallel and
        post-FFN-norm blocks; equals the new stream N(r + y) under a residual-reading norm (OPT post-LN)."""
        y = self.output(m) if y is None else y
        s = self.norm_scale(y, resid) if self.post_norm is not None else None
        return self.written(m, s) + self.written_rest(s, resid)


def _affine(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x @ W
    return y if b is None else y + b


class Adapter:
    """Maps one Hugging Face model family onto the uniform view.

    Subclasses set ``model_types``, declare ``handled`` (field -> supported values) and ``ignored``
    (fields irrelevant to the FFN view) for ``check_config`` (kvmem.models.fields), and implement the
    module look-ups. ``placement`` says where the block's norms sit relative to the FFN ("pre",
    "parallel", "post-ffn", "post-residual"; a family may depend on its config: ``norm_placement``).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = ""
    gated: ClassVar[bool] = False
    fused_gate_up: ClassVar[bool] = False  # gate and up projections stored as one Linear (split in the view)
    act_field: ClassVar[str] = "hidden_act"
    handled: ClassVar[dict] = {}
    ignored: ClassVar[frozenset] = frozenset()
    placement: ClassVar[str] = "pre"
    moe: ClassVar[str] = "dense"

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.check_config(self.config)
        self.layers = [self.layer(i) for i in range(self.n_layers)]
        self.check_shapes()

    # --- per family -------------------------------------------------------------------
    def check_config(self, config) -> None:
        """Refuse any config field the family does not declare, or a handled one with an unsupported value."""
        check_fields(config, self.family, self.handled, self.ignored)

    @classmethod
    def activations(cls) -> tuple[str, ...]:
        """The activation names the adapter accepts (from its declaration of ``act_field``)."""
        allowed = cls.handled.get(cls.act_field, ())
        return tuple(allowed) if isinstance(allowed, tuple) else ()

    @property
    def norm_placement(self) -> str:
        return self.placement

    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def layer(self, i: int) -> FFNLayer:
        raise NotImplementedError

    def embed(self) -> nn.Module:
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def unembed(self) -> nn.Module:
        """The LM head (a Linear from d_model to d_vocab)."""
        return self.model.get_output_embeddings()

    # --- model-level scales (where embeddings or logits are read) -----------------------
    @property
    def embedding_scale(self) -> float:
        """s_E: the token embedding entering block 0 is s_E·W_E[id]. Gemma's embedding module multiplies by
        sqrt(d_model) rounded to the weight dtype (read from the module); Granite's embedding_multiplier."""
        scale = getattr(self.embed(), "embed_scale", None)
        if scale is None:
            return 1.0
        return float(torch.as_tensor(scale).to(self.embed().weight.dtype))

    @property
    def W_E(self) -> torch.Tensor:
        """[d_vocab, d_model] token embeddings as the residual stream sees them, before ``embedding_scale``."""
        return self.embed().weight

    @property
    def logit_scale(self) -> float:
        """Factor the model multiplies its logits by (Cohere's logit_scale, 1/Granite's logits_scaling)."""
        return 1.0

    @property
    def logit_softcap(self) -> float | None:
        """c in logits = c·tanh(logits/c) (Gemma 2/3 final_logit_softcapping), applied after logit_scale."""
        return None

    def logit_transform(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits from final_norm(h)·W_U + b_U [..., d_vocab] (identity for most families).
        Soft-capping is monotone per token, so rankings read from untransformed logits stay right; values
        and probabilities need this."""
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        cap = self.logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # --- shared -------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.blocks())

    @property
    def activation(self) -> str:
        return str(getattr(self.config, self.act_field))

    @property
    def W_U(self) -> torch.Tensor:
        """[d_model, d_vocab] (a view; tied embeddings are fine)."""
        return self.unembed().weight.T

    @property
    def b_U(self) -> torch.Tensor | None:
        return getattr(self.unembed(), "bias", None)

    def check_shapes(self) -> None:
        d_model = self.config.hidden_size
        d_mlp = self.layers[0].d_mlp
        for lay in self.layers:
            shapes = {"W_in": lay.W_in.shape, "W_out": lay.W_out.shape}
            if lay.gated:
                shapes["W_gate"] = lay.W_gate.shape
            want = {"W_in": (d_model, d_mlp), "W_out": (d_mlp, d_model), "W_gate": (d_model, d_mlp)}
            for name, shape in shapes.items():
                if tuple(shape) != want[name]:
                    raise KvmemError(
                        f"{self.family} adapter: layer {lay.index} {name} has shape {tuple(shape)}, "
                        f"expected {want[name]}; refusing to guess"
                    )
        if tuple(self.W_U.shape[:1]) != (d_model,):
            raise KvmemError(f"{self.family} adapter: W_U shape {tuple(self.W_U.shape)} does not start with d_model")
