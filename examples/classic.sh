#!/usr/bin/env bash
# The full classic cycle with jq and curl: zip, upload, poll, download, unzip.
#   examples/classic.sh [URL] [JOB_ID] [DIR_WITH_RUN_SH] [OUT_DIR]
set -euo pipefail
url=${1:-http://localhost:8080}
id=${2:-example-$(date +%s)}
dir=${3:-$(dirname "$0")/job}
out=${4:-./result-$id}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$dir" && zip -qr "$work/files.zip" .)
jq -n --arg id "$id" --arg input "$(base64 "$work/files.zip")" '{id: $id, input: $input}' > "$work/job.json"

code=$(curl -s -o "$work/upload.json" -w '%{http_code}' -X POST "$url/api/upload" \
       -H "Content-Type: application/json" -d @"$work/job.json")
if [ "$code" != 201 ]; then
    echo "upload refused ($code): $(jq -r .message "$work/upload.json")" >&2
    exit 1
fi
echo "submitted $id"

while :; do
    code=$(curl -s -o "$work/result.json" -w '%{http_code}' "$url/api/get/$id")
    case "$code" in
        200) break ;;
        202) sleep 0.5 ;;
        *) echo "unexpected answer $code: $(cat "$work/result.json")" >&2; exit 1 ;;
    esac
done

jq -r .Output "$work/result.json" | base64 -d > "$work/result.zip"
mkdir -p "$out"
(cd "$out" && unzip -qo "$work/result.zip")
status=$(jq -r .Status "$work/result.json")
echo "$id: $status: $(jq -r .Message "$work/result.json") (files in $out)"
[ "$status" = SUCCESS ]
