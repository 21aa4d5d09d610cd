#!/usr/bin/env bash
# Build dist/jobd: one shiv zipapp, pure Python, for CPython 3.9 and newer.
#
#   ./build.sh            build (and smoke-test) dist/jobd
#   ./build.sh && dist/jobd   build, then start the daemon on :8080
#
# The dependencies are resolved for Python 3.9 whatever Python builds, so the conditional
# backports (typing_extensions, exceptiongroup) are inside and the file runs on 3.9 to 3.13+.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import shiv" 2>/dev/null; then
    "$VENV/bin/pip" install -q --disable-pip-version-check shiv==1.0.8 setuptools wheel
fi

rm -rf build/wheel dist/jobd
mkdir -p build/wheel dist
"$VENV/bin/pip" wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
    -w build/wheel . 2>/dev/null || \
    "$VENV/bin/pip" wheel -q --disable-pip-version-check --no-deps -w build/wheel .

# Pins come from setup.cfg's install_requires, read here so they are written down once.
mapfile -t PINS < <("$VENV/bin/python" - <<'PY'
import configparser
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
for line in cfg["options"]["install_requires"].strip().splitlines():
    if line.strip() and not line.strip().startswith("#"):
        print(line.strip())
PY
)

# --root /tmp: shiv unpacks its site-packages on first start to <root>/jobd_<build id>; the
# default ~/.shiv fails with an unwritable HOME. SHIV_ROOT overrides it at run time (the
# Dockerfile pre-unpacks into /opt/jobd-cache for read-only containers).
"$VENV/bin/shiv" -q \
    -o dist/jobd \
    -e jobd.__main__:main \
    -p '/usr/bin/env python3' \
    --root /tmp \
    --compile-pyc \
    --reproducible \
    --python-version 3.9 --only-binary=:all: --implementation py --abi none --platform any \
    build/wheel/jobd-*.whl "${PINS[@]}"

# Smoke test: the file starts and answers --version with a private unpack root.
smoke=$(mktemp -d)
trap 'rm -rf "$smoke"' EXIT
SHIV_ROOT="$smoke" dist/jobd --version >/dev/null
echo "built dist/jobd ($(stat -c %s dist/jobd) bytes)"
