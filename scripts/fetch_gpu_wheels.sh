#!/usr/bin/env bash
# Download into .whl/ the wheels the GPU machine (nvidia-h200: python3 3.12, no registry) lacks for
# scripts/gpu_bench.sh, then check them (scripts/gpu_wheels_check.py). Run here, from the repo root,
# with network to PyPI; .whl/ is ignored through .git/info/exclude and travels with `carry: [".whl"]`.
#
# Carried (versions = this machine's env, where kvmem's tests pass):
#   transformers          the version kvmem is tested with (the image has 5.17; the adapters compare HF
#                         configs field by field, so the benchmark runs on the tested version)
#   transformer-lens      the tlens-cache baseline, and what its import and TransformerBridge path import
#                         that the image lacks: datasets, multiprocess, dill, beartype, typeguard, fancy-einsum
#   regex                 transformers checks regex>=2025.10.22 at import; the image's version is not recorded
# Not carried: wandb, transformers-stream-generator (Requires-Dist of transformer-lens, never imported by
# the bridge path: the import check blocks them and passes), kvmem's own plotly/gguf (report and GGUF
# loading only). Total about 16 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
WHEELS=(
  transformers==5.24.0
  transformer-lens==4.3.0
  datasets==5.2.0
  multiprocess==0.70.19
  dill==0.4.1
  beartype==0.23.1
  typeguard==4.6.1
  fancy-einsum==0.0.3
  regex==2026.5.9
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
ls -la .whl
# every Requires-Dist met by the device image or another wheel
python3 scripts/gpu_wheels_check.py requires .whl || echo "(requirements above not met: see whether the run imports them)"
# install as the device does, then import and run the smoke benchmark with everything else blocked
rm -rf /tmp/kvmem-whl-site
# (--python-version 3.12: the py312-only multiprocess wheel installs here too, pure python; compiled cp312
# wheels (regex) cannot import on this machine's 3.11: left out here, this machine's own version serves)
pure=$(ls .whl/*.whl | grep -v -- '-cp3' || true)
echo "import check without the compiled wheels: $(ls .whl/*.whl | grep -- '-cp3' | xargs -r -n1 basename | tr '\n' ' ')"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kvmem-whl-site \
  --python-version 3.12 --only-binary=:all: $pure
python3 scripts/gpu_wheels_check.py imports /tmp/kvmem-whl-site .whl
