#!/usr/bin/env bash
# GPU run (the lead's lent H100/H200): install carried wheels and the project, then the GPU checks,
# the gpu-marked tests and a GPU influence scan. Prepared here, carried: `.whl/` (wheels the GPU image
# lacks: transformers 5.24, captum, umap-learn, pynndescent, compressed-tensors, gguf, pydantic, loguru)
# and `.gpu/` (the SmolLM2 tokenizer files in .gpu/smol_tok and the Lee corpus files under
# .gpu/site/gensim/test/test_data; the 98 MB GGUF is over the carry limit, so the timing model is a
# random-weight model of SmolLM2-135M's shape).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/wb . || exit 1
export PYTHONPATH=/tmp/wb:/tmp/site:$PWD/.gpu/site
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# `bash bench/gpu/run.sh scale`: only the 8B-shaped scale check (issue 13; under 8 minutes of the 15)
if [ "${1:-}" = "scale" ]; then
  timeout 480 python3 bench/gpu/scale_8b.py --json-out $OUT/scale_8b.json 2>&1 | grep -v -i "loading\|warn" | tail -40 | tee $OUT/scale_8b.log
  exit 0
fi
python3 bench/gpu_check.py --json-out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log
R=$PWD; (cd /tmp && python3 -m pytest -q -p no:cacheprovider --rootdir $R -m gpu $R/tests/test_influence.py $R/tests/test_fuse.py $R/tests/test_views.py $R/tests/test_sparsity.py $R/tests/test_quantize.py $R/tests/test_precision_plan.py) 2>&1 | tail -15 | tee $OUT/pytest_gpu.log
python3 bench/gpu/make_model.py /tmp/smol >/dev/null 2>&1
timeout 150 python3 bench/influence_scan.py --model /tmp/smol 2>&1 | grep -v -i "loading\|warn" | tail -15 | tee $OUT/influence_scan_gpu.log
