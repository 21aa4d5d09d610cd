"""A stand-in research tool: reverses the residue order of each chain in a sequence file."""

import sys


def main(source: str, target: str) -> None:
    with open(source) as inp, open(target, "w") as out:
        for line in inp:
            line = line.rstrip("\n")
            out.write(line if line.startswith(">") else line[::-1])
            out.write("\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
