"""Check, on this machine, that the wheels in .whl/ complete the GPU machine's image for the benchmark.

The GPU machine (nvidia-h200) has no registry; its python3 (3.12) holds the packages listed in DEVICE
below (read from /work/.library/device/KINDS.md, image 'cuda', 2026-11-17; a few versions from its pip
list). Two checks:

  requires   every Requires-Dist of every carried wheel (markers evaluated for CPython 3.12 on Linux,
             no extras) is met by another carried wheel or by a device package (versions checked where
             the device's version is known); unmet ones are printed, with whether the measured path
             imports them.
  imports    `python gpu_wheels_check.py imports DIR` runs the benchmark's imports with DIR (the wheels
             installed there with --target --no-deps --no-index) first on sys.path and every module of
             a distribution that is neither on the device nor carried blocked: an import that needs one
             fails here as it would there. (This machine's python is 3.11: a compiled wheel is not
             imported here; pure-python wheels are.)

  python scripts/gpu_wheels_check.py requires .whl
  python scripts/gpu_wheels_check.py imports /tmp/site .whl
  python3 scripts/gpu_wheels_check.py requires-here .whl     # on the GPU machine, PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

DEVICE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"""
DEVICE = {canonicalize_name(n) for n in DEVICE.split()}
KNOWN = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
         "tokenizers": "0.23.2", "torch": "2.11.0", "transformers": "5.17.0", "triton": "3.6.0",
         "jaxtyping": "0.3.11", "sentencepiece": "0.2.2"}
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "os_name": "posix", "extra": ""}


def wheels(folder: Path) -> dict[str, tuple[str, Path]]:
    """canonical name -> (version, path) of each wheel in the folder."""
    out = {}
    for w in sorted(folder.glob("*.whl")):
        name, version = w.name.split("-")[:2]
        out[canonicalize_name(name)] = (version, w)
    return out


def installed_version(dep: str) -> str | None:
    try:
        return md.version(dep)
    except md.PackageNotFoundError:
        return None


def requires(folder: Path, here: bool = False) -> int:
    """Unmet Requires-Dist of the carried wheels; ``here``: against the packages installed where this runs
    (the GPU machine, after the wheels are installed there) instead of the recorded device list."""
    carried = wheels(folder)
    bad, unknown = 0, []
    for name, (version, path) in carried.items():
        with zipfile.ZipFile(path) as z:
            meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        for line in re.findall(r"^Requires-Dist: (.+)$", meta, flags=re.M):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(ENV):
                continue
            dep = canonicalize_name(req.name)
            if here:
                have, where = installed_version(dep), "installed"
                if have is None:
                    print(f"UNMET    {name} {version}: {line}  (not installed)")
                    bad += 1
                    continue
            elif dep in carried:
                have, where = carried[dep][0], "carried"
            elif dep in DEVICE:
                have, where = KNOWN.get(dep), "device"
            else:
                print(f"UNMET    {name} {version}: {line}  (neither carried nor on the device)")
                bad += 1
                continue
            if have is not None and not req.specifier.contains(Version(have), prereleases=True):
                print(f"VERSION  {name} {version}: {line}  ({where} has {have})")
                bad += 1
            elif have is None and req.specifier:
                unknown.append(f"{req}")
    print(f"{len(carried)} wheels, {sum(p.stat().st_size for _, p in carried.values()) / 2**20:.1f} MiB, "
          f"{bad} requirement(s) not met" + (f"; device versions not recorded (checked there by gpu_bench.sh): "
                                             f"{', '.join(sorted(set(unknown)))}" if unknown else ""))
    return bad


def block(allowed: set[str]) -> list[str]:
    """Makes every top-level module of a distribution outside ``allowed`` unimportable (sys.modules[name] =
    None: `import` raises ModuleNotFoundError and importlib.util.find_spec answers None, as when absent)."""
    names = []
    for top, owners in md.packages_distributions().items():
        if top not in sys.modules and not {canonicalize_name(d) for d in owners} & allowed:
            sys.modules[top] = None
            names.append(top)
    return names


def imports(site: Path, folder: Path) -> int:
    carried = set(wheels(folder))
    sys.path.insert(0, str(site))
    # what the device image brings is imported first, unblocked (this machine's versions of it have other
    # needs, e.g. huggingface-hub 2 needs httpx2); the blocker then guards transformer_lens and the run
    import huggingface_hub.file_download  # noqa: F401
    import transformers  # noqa: F401  the carried one (same version as here) when carried

    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
    import scripts.bench_profile as bench

    blocked = block(DEVICE | carried | {"kvmem"})
    from transformer_lens.model_bridge import TransformerBridge  # noqa: F401

    rep = bench.main(["--smoke", "--skip", "forward-compiled", "--shape", "tiny-llama"])
    failed = {n: r["error"] for n, r in rep["results"].items() if "error" in r}
    print(f"imports: transformer_lens from {sys.modules['transformer_lens'].__file__}; {len(blocked)} modules of "
          f"distributions absent there blocked (e.g. {', '.join(sorted(blocked)[:8])}); failed methods: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "requires-here":
        sys.exit(requires(Path(sys.argv[2]), here=True))
    sys.exit(requires(Path(sys.argv[2])) if what == "requires" else imports(Path(sys.argv[2]), Path(sys.argv[3])))
