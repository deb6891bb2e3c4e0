#!/usr/bin/env bash
# The one GPU measurement of issue 14 (docs/gpu.md): run on the device machine (nvidia-h200) from the repo
# root, with .whl/ carried (scripts/fetch_gpu_wheels.sh made it here). Ends in about 5-8 minutes:
#
#   step                          budget  sizing (DESIGN.md's H100 figures; an H200 is no slower)
#   install wheels, versions      ~30 s
#   GPT-2 small, 1,048,576 tok    180 s   fwd+logits ~590k tok/s (~2 s), no head ~1.06M (~1 s), compiled
#                                         ~1.76M (~1 s) + inductor compile ~40 s, TransformerLens ~240k
#                                         (~4.5 s) + bridge boot, kvmem (unknown: 0.1-1M tok/s, 1-10 s)
#   Llama-3-8B shape, 131,072 tok 270 s   random init on the GPU in bf16 (~16 GB, seconds), fwd+logits
#                                         ~34k tok/s (~4 s), no head (~4 s), compiled (~3 s) + compile of
#                                         32 layers ~60-120 s, kvmem (~4-40 s); no TransformerLens (the
#                                         8B bar compares with the forward pass without LM head)
#
# Each shape runs under its own timeout and writes its JSON and markdown after every method, so a
# failure or a timeout keeps the figures measured before it. Files under $OUT (7, within the 8 that
# come back): env.txt, gpt2-small.log, llama3-8b.log, bench-gpt2-small.{json,md}, bench-llama3-8b.{json,md}.
set -uo pipefail
OUT=${OUT:-/tmp/kvmem-gpu-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
GPT2_TOKENS=${GPT2_TOKENS:-1048576} GPT2_TIMEOUT=${GPT2_TIMEOUT:-180}
L8B_TOKENS=${L8B_TOKENS:-131072} L8B_TIMEOUT=${L8B_TIMEOUT:-270}
if [ "${KVMEM_BENCH_SMOKE:-0}" = 1 ]; then  # the same script on CPU with tiny shapes (tests/scripts)
  S1=tiny-gpt2 S2=tiny-llama GPT2_TOKENS=512 L8B_TOKENS=512 DEVARGS=(--smoke)
else
  S1=gpt2-small S2=llama3-8b DEVARGS=(--seq-len 1024 --device cuda --dtype bfloat16)
fi
start=$SECONDS
if ls .whl/*.whl >/dev/null 2>&1 && [ "${KVMEM_BENCH_SMOKE:-0}" != 1 ]; then  # (smoke: this machine's env)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "WHEEL INSTALL FAILED: tlens-cache will record its error"
  export PYTHONPATH=/tmp/site:$PWD
  if ! python3 -c "import transformers" 2>"$OUT/import-error.txt"; then  # fall back to the image's
    echo "carried transformers does not import here (see import-error.txt): the image's transformers is used"
    rm -rf /tmp/site/transformers /tmp/site/transformers-*.dist-info
  else
    rm -f "$OUT/import-error.txt"
  fi
else
  echo "no wheels installed: this python's own transformers (and TransformerLens if it has one)"
  export PYTHONPATH=$PWD
fi
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, transformers.__file__)"
  python3 -c "import transformer_lens, importlib.metadata as m; print('transformer-lens', m.version('transformer-lens'), transformer_lens.__file__)"
  [ -d .whl ] && python3 scripts/gpu_wheels_check.py requires-here .whl
  git log -1 --format='kvmem %h %s' 2>/dev/null
  echo "setup: $((SECONDS - start)) s"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

run_shape() {  # shape timeout tokens extra-args...
  local shape=$1 limit=$2 tokens=$3; shift 3
  local t0=$SECONDS
  timeout -k 15 "$limit" python3 scripts/bench_profile.py --shape "$shape" --tokens "$tokens" "${DEVARGS[@]}" \
    --out "$OUT" "$@" > "$OUT/$shape.log" 2>&1
  local rc=$?
  echo "== $shape: exit $rc after $((SECONDS - t0)) s$([ $rc -ge 124 ] && echo ' (TIMEOUT: figures up to the last finished method kept)')" \
    | tee -a "$OUT/$shape.log"
  grep -E '^  round|Error|error' "$OUT/$shape.log" | tail -20
}
ONLY=${ONLY:-both}  # gpt2 | 8b | both: a rerun of one shape
[ "$ONLY" != 8b ] && run_shape "$S1" "$GPT2_TIMEOUT" "$GPT2_TOKENS"
[ "$ONLY" != gpt2 ] && run_shape "$S2" "$L8B_TIMEOUT" "$L8B_TOKENS" --skip tlens-cache kvmem-sync-off
echo "== total $((SECONDS - start)) s"
for f in "$OUT"/bench-*.md; do [ -f "$f" ] && cat "$f"; done
