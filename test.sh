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
# A pure cgroup v2 guest for tests/test_cgroup_v2_vm.py: qemu (software emulation is enough),
# a Debian kernel in /boot, a static busybox for its initramfs, mkfs.ext4 for its disks.
# Without recommends: qemu's would bring a desktop's worth of libraries.
vm=()
if [ "$(uname -m)" = x86_64 ]; then
    command -v qemu-system-x86_64 >/dev/null || vm+=(qemu-system-x86)
    compgen -G '/boot/vmlinuz-*' >/dev/null || vm+=(linux-image-cloud-amd64)
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' ||
        vm+=(busybox-static)
    PATH="$PATH:/usr/sbin:/sbin" command -v mkfs.ext4 >/dev/null || vm+=(e2fsprogs)
fi
if [ $(( ${#need[@]} + ${#vm[@]} )) -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq || echo "note: apt-get update failed; installing from the lists at hand" >&2
        if [ ${#need[@]} -gt 0 ]; then
            apt-get install -y -qq "${need[@]}" >/dev/null
        fi
        if [ ${#vm[@]} -gt 0 ]; then  # the VM test says why it skips if this fails
            apt-get install -y -qq --no-install-recommends "${vm[@]}" >/dev/null ||
                echo "note: could not install ${vm[*]}" >&2
        fi
    else
        echo "note: ${need[*]} ${vm[*]} missing; the tests that need them are skipped" >&2
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
