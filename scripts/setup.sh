#!/usr/bin/env bash
# Build .venv with the pinned CPU stack and install dlrm editable. Idempotent: re-running only
# installs what is missing. Why the odd steps:
#  - torch is pinned first so nothing later can pull the CUDA build (several GB).
#  - torchrec's metadata asks for the CUDA package fbgemm-gpu, which shares its module name with
#    fbgemm-gpu-cpu, so torchrec goes in with --no-deps and its real needs are named by hand.
#  - torchmetrics 1.0.3: newer releases break torchrec's AUC/NE metrics.
#  - So pip's resolver would report "torchrec 1.8.0 requires fbgemm-gpu, which is not installed"
#    after every later install: expected (fbgemm-gpu-cpu provides the same module), so that one
#    conflict is filtered out below; any other conflict is still shown.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
FBGEMM=${FBGEMM:-fbgemm-gpu-cpu==1.8.0}   # on a CUDA machine: FBGEMM=fbgemm-gpu==1.8.0

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# pip warns once per package about index folders this machine's pip.conf names but lacks: noise.
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither a file" | expected_conflict >&2); }
# Drop pip's resolver report when its only conflict is torchrec -> fbgemm-gpu (see above).
expected_conflict() {
  awk '/^ERROR: pip.s dependency resolver does not currently take into account/ { held = $0; next }
       /^torchrec [^ ]+ requires fbgemm-gpu, which is not installed\.$/ { next }
       { if (held != "") { print held; held = "" } print }'
}

pip install torch==2.13.0
pip install "$FBGEMM"
pip install --no-deps torchrec==1.8.0
pip install torchmetrics==1.0.3 tensordict pyre-extensions tqdm "iopath" "typing-inspect"
# The package itself (its dependencies are already satisfied, so nothing else is pulled in).
pip install -e ".[dev]"
"$VENV/bin/python" - <<'PY'
import torch, torchrec, fbgemm_gpu, torchmetrics  # noqa: F401  fail here, not in the first test
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"setup ok: torch {torch.__version__}, torchrec {torchrec.__version__ if hasattr(torchrec, '__version__') else '1.8.0'}, torchmetrics {torchmetrics.__version__}")
PY
