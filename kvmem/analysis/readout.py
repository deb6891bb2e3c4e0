"""The one vocabulary readout of the composition measures: the logit lens through the final norm.

Every vector the composition measures compare -- the residual stream before the FFN r [N, d_model],
the block output x = r + o, the FFN update o = m·W_out + b_out (b_out included: x = r + o exactly)
and each sub-update m_i·v_i -- is read with the same map, the model's own head:

    logits(y) = final_norm(y)·W_U + b_U        [N, d_vocab], float32

computed in float32 (the norm applied by a float32 copy of the model's final norm, W_U cast to
float32), with vocabulary ids the tokenizer does not define (padded unembedding rows) set to -inf,
so they are never a top token and get probability 0. Why this map: it is the one the model applies
to its last residual state (for the last layer, logits(x) are the model's logits), it is the readout
of Geva et al. 2021's released code (every vector through the model's output distribution), and the
norm makes tokens of vectors with different scales comparable.

The final norm is f(y) = γ ⊙ P(y) / s(y) + β with P the centring of LayerNorm (identity for RMSNorm),
s(y) > 0 a per-vector scale and β its bias (0 for RMSNorm). Hence:
  * a sub-update's top token depends only on the sign of m_i: top of f(±v_i) (the norm is
    scale-invariant up to its eps); ``value_tops`` gives both signs per neuron;
  * logit contributions are additive once the vector's scale is fixed: with g = γ'⊙P (γ' = γ up to a
    positive constant, probed from the module) and κ(o) = ‖f(o) - β‖ / ‖g(o)‖,
        logits(o)_w - (β·W_U + b_U)_w = Σ_i κ(o)·m_i·(g(v_i)·W_U)_w + κ(o)·(g(b_out)·W_U)_w
    exactly (``linear`` and ``kappa``). The probe is checked at construction; a norm outside this
    form is refused, named.
The adapter's logit transform (logit scale, soft-capping: monotone per logit) is applied before any
probability (``logits``); top tokens and the additive split use the untransformed ``raw`` logits.
With a post-FFN norm (Gemma 2/3, OLMo 2) the FFN update is what the layer writes (FFNLayer.write) and the
sub-updates are m_i·w_i·s with w_i the written value vectors and s > 0 the token's post-norm scale.
"""

from __future__ import annotations


import torch

from kvmem.errors import KvmemError

READOUT = ("logit lens through the final norm, float32: logits(y) = final_norm(y)·W_U + b_U for the residual "
           "before the FFN, the block output, the FFN update (with b_out) and every sub-update m_i·v_i (whose top "
           "token is that of final_norm(sign(m_i)·v_i), the norm being scale-invariant); ids the tokenizer does not "
           "define are masked")


class Readout:
    """The float32 logit lens of one model (see the module docstring). Axes: y [N, d_model] ->
    logits [N, d_vocab]."""

    def __init__(self, model, device=None):
        from kvmem.vocab import float32_norm, vocab_mask

        device = torch.device(device or model.device)
        self.device = device
        self.norm = float32_norm(model).to(device)
        self.W_U = model.W_U.detach().to(device=device, dtype=torch.float32)  # [d_model, d_vocab]
        b_U = model.adapter.b_U
        self.b_U = None if b_U is None else b_U.detach().to(device=device, dtype=torch.float32)
        self.defined = vocab_mask(model).to(device)  # [d_vocab] bool
        self.transform = model.adapter.logit_transform  # logit scale / soft-capping: monotone per logit
        d = self.W_U.shape[0]
        with torch.inference_mode():
            self.beta = self.norm(torch.zeros(1, d, device=device))[0]  # [d_model]
            ones = torch.ones(1, d, device=device)
            self.centred = bool(torch.allclose(self.norm(ones)[0], self.beta, atol=1e-6))
            g = torch.Generator().manual_seed(1234)
            z = self._p(torch.randn(2, d, generator=g).to(device) + 0.5)
            z[z.abs() < 1e-3] = 1e-3
            f = self.norm(z) - self.beta
            self.gamma = (f[0] / z[0])  # γ / s(z0): γ up to a positive constant
            check = self.gamma * z[1]
            k = f[1].norm() / check.norm()
            if not torch.allclose(f[1], k * check, rtol=1e-3, atol=1e-5):
                raise KvmemError(f"the final norm ({type(model.final_norm).__name__}) is not of the form "
                                 "gamma*P(y)/s(y) + beta: the composition readout cannot decompose it")
        self.mean_beta = self.beta @ self.W_U + (0 if self.b_U is None else self.b_U)  # [d_vocab] constant part
        # no norm bias and no LM-head bias: logits(-v) = -logits(v), so a neuron's top token for m < 0 is the
        # bottom token of its value vector through the final norm (kvmem.vocab's through_norm projection)
        self.symmetric = bool((self.beta == 0).all()) and self.b_U is None

    def _p(self, y: torch.Tensor) -> torch.Tensor:
        return y - y.mean(-1, keepdim=True) if getattr(self, "centred", False) else y

    @torch.inference_mode()
    def raw(self, y: torch.Tensor) -> torch.Tensor:
        """final_norm(y)·W_U + b_U [N, d_vocab] float32 for y [N, d_model], before the model's logit
        transform; undefined ids -inf."""
        out = self.norm(y.to(self.device, torch.float32)) @ self.W_U
        if self.b_U is not None:
            out = out + self.b_U
        return out.masked_fill_(~self.defined, float("-inf"))

    @torch.inference_mode()
    def logits(self, y: torch.Tensor) -> torch.Tensor:
        """The model's logits of y [N, d_vocab] float32: ``raw`` through the adapter's logit transform (logit
        scale, soft-capping; the same top token), undefined ids -inf."""
        out = self.transform(self.raw(y).masked_fill_(~self.defined, 0.0))
        return out.masked_fill_(~self.defined, float("-inf"))

    def linear(self, y: torch.Tensor) -> torch.Tensor:
        """g(y) = γ'⊙P(y) [N, d_model] float32: the linear part of the norm, up to the per-vector scale."""
        return self.gamma * self._p(y.to(self.device, torch.float32))

    def kappa(self, y: torch.Tensor) -> torch.Tensor:
        """κ(y) [N]: the factor with final_norm(y) - β = κ(y)·g(y)."""
        y = y.to(self.device, torch.float32)
        num = (self.norm(y) - self.beta).norm(dim=-1)
        den = self.linear(y).norm(dim=-1)
        return torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(den))

    @torch.inference_mode()
    def value_tops(self, W_out: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Top token of f(+v_i)·W_U and of f(-v_i)·W_U for every row v_i of W_out [d_mlp, d_model] (the
        written value vectors w_i where a post-FFN norm or a residual multiplier applies):
        two [d_mlp] int64 tensors (what neuron i's sub-update predicts when m_i > 0, when m_i < 0)."""
        pos, neg = [], []
        for start in range(0, W_out.shape[0], chunk):
            v = W_out[start:start + chunk].to(self.device, torch.float32)
            lv = self.raw(v)
            pos.append(lv.argmax(-1))
            if self.symmetric:  # one product serves both signs
                neg.append(lv.masked_fill_(~self.defined, float("inf")).argmin(-1))
            else:
                neg.append(self.raw(-v).argmax(-1))
        return torch.cat(pos), torch.cat(neg)
