#!/usr/bin/env bash
# The benchmark suite in one command: installs the peers it compares against (Debian's
# webhook and wrk) when missing, builds dist/jobd, and runs every section, appending a dated
# section to bench/RESULTS.md. Takes a few minutes.
#
#   bench/run.sh                       the full suite
#   bench/run.sh --smoke --no-write    tiny sizes, under a minute, nothing appended
#   bench/run.sh --only latency,store  some sections (see --help)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in webhook wrk; do
    command -v "$tool" >/dev/null || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "note: ${need[*]} missing (apt-get install ${need[*]}); those comparisons are skipped" >&2
    fi
fi

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
fi
./build.sh >/dev/null
exec .venv/bin/python -m bench "$@"
