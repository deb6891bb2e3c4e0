"""The uniform key-value view of one FFN layer, and the adapter protocol.

Orientation, the same for every family (adapters absorb storage quirks):
  W_in, W_gate  [d_model, d_mlp]   (W_in is the up projection of gated FFNs)
  W_out         [d_mlp, d_model]   (row i is neuron i's value vector)
  W_U           [d_model, d_vocab]

The coefficient vector m [batch, pos, d_mlp] is the input of ``out_module``:
  m = act(x·W_in + b_in)                         (GPT-2, NeoX, OPT)
  m = act(x·W_gate + b_gate) ⊙ (x·W_in + b_in)   (Llama, Mistral, Qwen2, Gemma)
and the FFN output is m·W_out + b_out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from kvmem.errors import KvmemError


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

    @property
    def gated(self) -> bool:
        return self.gate_module is not None

    @property
    def W_in(self) -> torch.Tensor:
        return linear_weight(self.in_module)

    @property
    def W_gate(self) -> torch.Tensor | None:
        return None if self.gate_module is None else linear_weight(self.gate_module)

    @property
    def W_out(self) -> torch.Tensor:
        return linear_weight(self.out_module)

    @property
    def b_in(self) -> torch.Tensor | None:
        return getattr(self.in_module, "bias", None)

    @property
    def b_gate(self) -> torch.Tensor | None:
        return None if self.gate_module is None else getattr(self.gate_module, "bias", None)

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


def _affine(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x @ W
    return y if b is None else y + b


class Adapter:
    """Maps one Hugging Face model family onto the uniform view.

    Subclasses set ``model_types`` and ``act_field`` and implement the module look-ups;
    ``check_config`` refuses configurations the adapter does not understand.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = ""
    gated: ClassVar[bool] = False
    act_field: ClassVar[str] = "hidden_act"

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.check_config(self.config)
        self.layers = [self.layer(i) for i in range(self.n_layers)]
        self.check_shapes()

    # --- per family -------------------------------------------------------------------
    def check_config(self, config) -> None:  # pragma: no cover - overridden when needed
        pass

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

    @staticmethod
    def require(config, field: str, allowed, family: str) -> None:
        value = getattr(config, field, None)
        if value not in allowed:
            raise KvmemError(f"{family} adapter: config.{field}={value!r} is not supported (supported: {allowed})")
