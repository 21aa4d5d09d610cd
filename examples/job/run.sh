#!/bin/sh
# The job a client uploads: runs the tool on its input, writes results into the working directory.
set -e
TOOL=${TOOL:-/opt/tool/reverse.py}
[ -f "$TOOL" ] || TOOL=./reverse.py      # outside the research image, the tool travels along
python3 "$TOOL" input.fasta reversed.fasta
echo "reversed $(grep -vc '^>' input.fasta) sequence line(s)"
