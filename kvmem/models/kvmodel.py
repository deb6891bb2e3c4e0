"""KVModel: a loaded model, its tokenizer and its adapter, the one object the library passes around.

Axes: token ids [batch, pos]; coefficients [batch, pos, d_mlp]; value logits [n, d_vocab].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvmem.errors import KvmemError
from kvmem.models.base import Adapter, FFNLayer
from kvmem.models.fingerprint import fingerprint
from kvmem.models.load import DEFAULT_MODEL, load_hf, resolve_device, resolve_dtype
from kvmem.models.registry import adapter_for


@dataclass
class KVModel:
    hf: torch.nn.Module
    tokenizer: object
    adapter: Adapter
    spec: str
    source: str
    device: torch.device
    dtype: torch.dtype
    _value_norms: dict = field(default_factory=dict, repr=False)
    _fingerprint: tuple | None = field(default=None, repr=False)

    # --- shapes and weights -----------------------------------------------------------
    @property
    def layers(self) -> list[FFNLayer]:
        return self.adapter.layers

    @property
    def n_layers(self) -> int:
        return len(self.adapter.layers)

    @property
    def d_model(self) -> int:
        return self.hf.config.hidden_size

    @property
    def d_mlp(self) -> int:
        return self.layers[0].d_mlp

    @property
    def d_vocab(self) -> int:
        return self.W_U.shape[1]

    @property
    def gated(self) -> bool:
        return self.adapter.gated

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def activation(self) -> str:
        return self.adapter.activation

    @property
    def W_U(self) -> torch.Tensor:
        return self.adapter.W_U

    @property
    def final_norm(self) -> torch.nn.Module:
        return self.adapter.final_norm()

    def value_norms(self, layer: int) -> torch.Tensor:
        """‖w_i‖ for every neuron of a layer, [d_mlp] (float32, cached): w_i = what neuron i writes per unit
        coefficient (FFNLayer.value_vectors_written: v_i, times Granite's residual multiplier, times the
        post-norm gain γ of Gemma 2/3 / OLMo 2 before the token's scale s). ‖v_i‖ for the other families."""
        if layer not in self._value_norms:
            self._value_norms[layer] = self.layers[layer].value_vectors_written().norm(dim=1)
        return self._value_norms[layer]

    # --- tokens ---------------------------------------------------------------------------
    def encode(self, prompt: str) -> torch.Tensor:
        """Token ids of a prompt, [1, pos], on the model's device."""
        if not prompt or not prompt.strip():
            raise KvmemError("the prompt is empty")
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0:
            raise KvmemError("the prompt gives no tokens")
        return ids.to(self.device)

    def token_strings(self, ids) -> list[str]:
        """Each id decoded on its own (so ' Paris' keeps its leading space)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return [self.tokenizer.decode([i]) for i in ids]

    # --- running --------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits [batch, pos, d_vocab] (float32)."""
        return self.hf(input_ids=input_ids).logits.float()

    def value_vectors(self, neurons) -> torch.Tensor:
        """v_i (rows of W_out) for (layer, neuron) pairs, [n, d_model]."""
        return torch.stack([self.layers[layer].W_out[neuron] for layer, neuron in neurons])

    def written_vectors(self, neurons) -> torch.Tensor:
        """w_i for (layer, neuron) pairs, [n, d_model] in the model's dtype: the direction neuron i writes into
        the residual stream (FFNLayer.value_vectors_written; = v_i except for post-norm and Granite layers)."""
        whole: dict[int, torch.Tensor] = {}  # layer -> its w_i [d_mlp, d_model], computed once per call
        rows = []
        with torch.inference_mode():
            for layer, neuron in neurons:
                lay = self.layers[layer]
                if lay.post_norm is None and lay.write_scale == 1.0:
                    rows.append(lay.W_out[neuron])
                    continue
                if layer not in whole:
                    whole[layer] = lay.value_vectors_written().to(self.dtype)
                rows.append(whole[layer][neuron])
        return torch.stack(rows)

    def value_logits(self, neurons, *, through_norm: bool = False, sign=None) -> torch.Tensor:
        """w_i·W_U for (layer, neuron) pairs, [n, d_vocab] float32, w_i the written vector (v_i for pre-norm
        families; γ⊙v_i behind Gemma 2/3 and OLMo 2 post-norms). ``sign`` [n] flips values (what a negative
        coefficient writes); ``through_norm`` applies the final norm to the vector first, as if it were the
        residual stream. No logit transform (soft-capping, logit scale): both keep every row's ranking."""
        with torch.inference_mode():
            v = self.written_vectors(neurons)
            if sign is not None:
                v = v * torch.as_tensor(sign, device=v.device, dtype=v.dtype)[:, None]
            if through_norm:
                v = self.final_norm(v)
            return (v @ self.W_U).float()

    def fingerprint(self) -> str:
        """16 hex digits of what the model computes: its architecture fields and a sample of every
        weight (kvmem.models.fingerprint), the same wherever the weights were loaded from. Cached
        until a parameter is replaced or edited in place (torch's per-tensor version counter)."""
        key = tuple((p.data_ptr(), p._version) for p in self.hf.parameters())
        if self._fingerprint is None or self._fingerprint[0] != key:
            self._fingerprint = (key, fingerprint(self.hf))
        return self._fingerprint[1]

    def info(self) -> dict:
        n_params = sum(p.numel() for p in self.hf.parameters())
        ffn = {id(p): p.numel() for lay in self.layers for m in (lay.in_module, lay.gate_module, lay.out_module,
                                                           getattr(lay, "layout", None) and lay.ffn_module)
               if m is not None for p in m.parameters()}
        return {
            "model": self.spec,
            "source": self.source,
            "family": self.family,
            "model_type": self.hf.config.model_type,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "d_vocab": self.d_vocab,
            "activation": self.activation,
            "gated": self.gated,
            "norm_placement": self.adapter.norm_placement,
            "write_scale": self.layers[0].write_scale,
            "embedding_scale": self.adapter.embedding_scale,
            "logit_scale": self.adapter.logit_scale,
            "logit_softcap": self.adapter.logit_softcap,
            "n_params": n_params,
            "ffn_params": sum(ffn.values()),
            "ffn_param_share": sum(ffn.values()) / n_params,
            **({"moe": self.adapter.moe_layout()} if hasattr(self.adapter, "moe_layout") else {}),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }


def load(spec: str = DEFAULT_MODEL, *, device: str = "auto", dtype: str = "auto") -> KVModel:
    """Load a model spec (bundled alias, HF directory, .gguf file or Hub id) as a KVModel."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    hf, tok, source = load_hf(spec)
    return from_hf(hf, tok, spec=spec, source=source, device=dev, dtype=dt)


def from_hf(hf, tokenizer, *, spec: str = "<in-memory>", source: str = "<in-memory>",
            device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> KVModel:
    """Wrap an already-loaded Hugging Face causal LM (and tokenizer) as a KVModel."""
    device = torch.device(device)
    hf = hf.to(device=device, dtype=dtype).eval().requires_grad_(False)  # kvmem reads, never trains
    return KVModel(hf, tokenizer, adapter_for(hf), spec, source, device, dtype)
