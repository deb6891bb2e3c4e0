"""Where each layer's statistics live when a model is spread over several devices (``--device-map auto``).

A model too large for one GPU is split by accelerate's big-model dispatch: consecutive decoder layers on
consecutive GPUs (``hf_device_map``: module name -> device). Each layer's coefficients m are computed on
that layer's device, so its LayerStats live there too (read off the layer's W_out: ``layer_devices``); the
update never moves [N, d_mlp] across devices, only the batch's token ids, document ids and positions [N]
(int64, a few KB, an asynchronous peer copy). At the end (and at checkpoints) the states are read back
to the host, which merges them into one run file; ``gather`` puts them on one device for callers that
want them together.

How a 70B model (Llama-3-70B: 80 layers, d_mlp 28672, bf16 weights about 140 GB) is profiled:

* 2 x 80 GB (A100/H100): ``kvmem profile --device-map auto --dtype bfloat16``: about 70 GB of weights per
  GPU, the rest for activations of a batch and the statistics (per layer about d_mlp x (4 stores x k x 8
  bytes + 197 x 8 histogram bytes + ...) ~ 70 MB at k = 20, 5.6 GB for 80 layers, split over the two GPUs)
  and the transient [N, d_mlp] buffers of the update (about 40 bytes per entry: lower the batch with
  ``--batch-size``; the runner backs off on out-of-memory by itself). The forward pass runs the GPUs one
  after the other (pipeline without micro-batches): the throughput of one GPU, the memory of two.
* With more GPUs, data parallelism over groups: each torchrun rank sees its own group through
  CUDA_VISIBLE_DEVICES, e.g. 4 GPUs as 2 ranks of 2:
      CUDA_VISIBLE_DEVICES=0,1 torchrun --nnodes 1 --nproc-per-node 1 --node-rank 0 ... kvmem profile
      --device-map auto --shard 0/2 ...; CUDA_VISIBLE_DEVICES=2,3 ... --shard 1/2 ..., then ``kvmem merge``
  (or one torchrun launch whose ranks each set CUDA_VISIBLE_DEVICES before CUDA initialises: the
  LOCAL_RANK-th group). Shards merge exactly (LayerStats.merge).
* 1 x 141 GB (H200): bf16 weights (about 140 GB) leave no room for activations and statistics, so no
  single-GPU pass over all layers. ``--device-map auto`` lets accelerate offload what does not fit to the
  CPU, but offloaded layers are not profiled (``layer_devices`` refuses them): profile the layers that
  stay on the GPU (``--layers``; the forward pass stops after the last one, so the offloaded upper layers
  never run). 8-bit or fp8 weights (bitsandbytes, torchao: about 70 GB) would fit, but kvmem's adapters
  read W_in / W_out as dense tensors: quantized checkpoints are not supported. Use two GPUs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvmem.errors import KvmemError

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel


def device_of(value) -> torch.device:
    """accelerate's device map value (int GPU index, "cpu", "cuda:1", "disk", torch.device) as a device."""
    if isinstance(value, int):
        return torch.device("cuda", value)
    if value == "disk":
        return torch.device("meta")
    return torch.device(value)


def devices_from_map(hf_device_map: dict, module_names: dict[int, str]) -> dict[int, torch.device]:
    """Per layer the device of its FFN module from an ``hf_device_map`` (module name -> device): the entry of
    the longest module name that is the layer's module or one of its parents. module_names: layer -> the
    module path of that layer's FFN (e.g. "model.layers.3.mlp")."""
    out = {}
    for layer, name in module_names.items():
        best = None
        for key, value in hf_device_map.items():
            if key == "" or name == key or name.startswith(key + "."):
                if best is None or len(key) > len(best[0]):
                    best = (key, value)
        if best is None:
            raise KvmemError(f"device map names no module holding layer {layer} ({name})")
        out[layer] = device_of(best[1])
    return out


def block_names(hf) -> dict[int, str]:
    """Decoder layer index -> module name of its block (``model.layers.3``, ``transformer.h.3``, ...): the
    numbered children of the model's one ModuleList of blocks."""
    names: dict[int, str] = {}
    for name, module in hf.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and not names:
            if name.rsplit(".", 1)[-1] in ("layers", "h", "blocks", "layer"):
                names = {i: f"{name}.{i}" for i in range(len(module))}
    return names


def layer_devices(model: KVModel, layers) -> dict[int, torch.device]:
    """Per profiled layer the device its statistics live on: from accelerate's ``hf_device_map`` when the
    model was dispatched (the entry holding the layer's block), else the device of the layer's W_out.
    Refuses a layer whose weights accelerate offloaded (CPU or disk offload: "disk", or W_out on "meta")."""
    out = {}
    dmap = getattr(model.hf, "hf_device_map", None)
    mapped = devices_from_map(dmap, {i: n for i, n in block_names(model.hf).items() if i in layers}) if dmap else {}
    for layer in layers:
        dev = mapped.get(layer, model.layers[layer].W_out.device)
        if dev.type == "meta":
            raise KvmemError(f"layer {layer} is offloaded (its weights are not on a device): profile the layers "
                             f"on the GPUs with --layers, or use more GPUs")
        out[layer] = dev
    return out


def gather(stats: dict, device="cpu") -> dict:
    """The LayerStats of every layer on one device (exact: through state_dict / from_state_dict)."""
    from kvmem.stats.layer import LayerStats

    dev = torch.device(device)
    return {layer: s if s.device == dev else LayerStats.from_state_dict(s.state_dict(), device=dev)
            for layer, s in stats.items()}
