#!/usr/bin/env bash
# Startup cost of dist/jobd: the first start (shiv unpacks its dependencies into a fresh
# SHIV_ROOT) and later starts (already unpacked), with hyperfine (apt install hyperfine).
#
#   bench/startup.sh [PYTHON...]      default: every python3.9 ... python3.13 found
#
# Measured: `jobd --version` (bootstrap + the click group), a client command that fails at
# once (`jobd status x` against a closed port: what a client start costs), and, for reference,
# the bare interpreter. The interpreter is called directly, so a pyenv shim is not measured.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v hyperfine >/dev/null || { echo "needs hyperfine (apt install hyperfine)" >&2; exit 1; }
[ -f dist/jobd ] || ./build.sh >/dev/null

pythons=("$@")
if [ ${#pythons[@]} = 0 ]; then
    for v in 3.9 3.10 3.11 3.12 3.13; do
        found=$(command -v "python$v" 2>/dev/null || true)
        for candidate in "$found" "/root/.pyenv/versions/$v"*/bin/"python$v"; do
            if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c pass 2>/dev/null; then
                pythons+=("$(readlink -f "$candidate")")
                break
            fi
        done
    done
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "dist/jobd: $(stat -c %s dist/jobd) bytes; $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg)"
for py in "${pythons[@]}"; do
    echo
    echo "== $("$py" -c 'import sys; print("Python %d.%d.%d" % sys.version_info[:3])') ($py)"
    hyperfine -N -i --style basic --runs 10 --prepare "rm -rf $work/first" \
        -n "first start (unpack)" "env SHIV_ROOT=$work/first $py dist/jobd --version" 2>&1 |
        grep -E "^(Benchmark|  Time|  Range)"
    env SHIV_ROOT="$work/warm" "$py" dist/jobd --version >/dev/null
    hyperfine -N -i --style basic --warmup 3 --runs 20 \
        -n "later start: --version" "env SHIV_ROOT=$work/warm $py dist/jobd --version" \
        -n "later start: client command" \
        "env SHIV_ROOT=$work/warm $py dist/jobd status x --url http://127.0.0.1:$port" \
        -n "bare interpreter" "$py -c pass" 2>&1 |
        grep -E "^(Benchmark|  Time|  Range)"
    rm -rf "$work/first" "$work/warm"
done

# The daemon: from exec to the first 200 of /health (uvicorn and starlette imported, database
# opened), first start and later starts, with the interpreter dist/jobd's shebang finds.
python3 - "$work" <<'PY'
import os, socket, statistics, subprocess, sys, time, urllib.request
work = sys.argv[1]

def ready_after(root: str) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SHIV_ROOT": root, "PORT": str(port), "JOBD_HOST": "127.0.0.1",
           "DATAPATH": f"{work}/data", "DB_PATH": f"{work}/db", "JOBD_ACCESS_LOG": "false"}
    started = time.perf_counter()
    proc = subprocess.Popen(["dist/jobd"], env=env, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                return time.perf_counter() - started
            except OSError:
                time.sleep(0.005)
    finally:
        proc.terminate()
        proc.wait()

first = []
for n in range(5):
    first.append(ready_after(f"{work}/daemon-first-{n}"))
ready_after(f"{work}/daemon-warm")
later = [ready_after(f"{work}/daemon-warm") for _ in range(10)]
print(f"\n== daemon, exec to first /health answer ({sys.version.split()[0]} for the script;"
      " dist/jobd runs with its shebang's python3)")
print(f"first start: median {statistics.median(first) * 1000:.0f} ms "
      f"(min {min(first) * 1000:.0f}, max {max(first) * 1000:.0f})")
print(f"later start: median {statistics.median(later) * 1000:.0f} ms "
      f"(min {min(later) * 1000:.0f}, max {max(later) * 1000:.0f})")
PY
