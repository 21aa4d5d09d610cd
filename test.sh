#!/usr/bin/env bash
# Run every test: installs what a fresh machine lacks, builds dist/jobd, lints, runs pytest.
#
#   ./test.sh                 the whole suite (what .ci/run calls)
#   ./test.sh -k classic      extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}

# System tools the black-box tests drive (the spec's jq+curl client, zip, unzip), and
# debootstrap for the Debian images of tests/test_images.py (cached in /var/cache/jobd-test-rootfs).
need=()
for tool in jq curl zip unzip debootstrap; do
    command -v "$tool" >/dev/null || need+=("$tool")
done
# A real single-node Slurm for tests/test_slurm.py (started by the tests themselves, as root).
if ! PATH="$PATH:/usr/sbin:/sbin" command -v slurmctld >/dev/null ||
   ! PATH="$PATH:/usr/sbin:/sbin" command -v munged >/dev/null; then
    need+=(slurm-wlm munge)
fi
# util-linux: unshare and nsenter (jobd as PID 1 of a PID namespace), setsid (test jobs).
for tool in unshare nsenter setsid; do
    command -v "$tool" >/dev/null || { need+=(util-linux); break; }
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "note: ${need[*]} missing; the tests that need them are skipped" >&2
    fi
fi

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true

./build.sh
.venv/bin/ruff check jobd tests bench

status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" = 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit "$status"
