"""Coverage-guided fuzzing of the archive reader with atheris (libFuzzer for Python).

    .venv/bin/python tests/fuzz_archive.py -max_total_time=30        what CI runs (test_fuzz.py)
    .venv/bin/python tests/fuzz_archive.py -atheris_runs=200000 DIR  longer, with a corpus DIR

Every input is written to a file and handed to `archive.detect`, `archive.check_zip` and
`archive.extract` (into a fresh directory), with small limits so each run is quick. The only
acceptable failure is ArchiveError; any other exception, and any file that appears outside
the destination, is a crash: libFuzzer stops and saves the input (`-artifact_prefix`).
The seeds (valid zip, tar, tar.gz, a symlink and a hard link) are written at start, so the
mutations begin from the formats' real structure.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's jobd

# The stdlib readers are imported here first, so they are instrumented too (their branches are
# where damaged archives go).
with atheris.instrument_imports(include=["jobd", "zipfile", "tarfile", "gzip", "_compression"]):
    import gzip  # noqa: F401
    import tarfile
    import zipfile

    from jobd import archive

LIMITS = archive.Limits(max_size=1 << 20, max_entries=64, ratio_floor=64 << 10,
                        max_name=512, max_depth=16)
BOX = Path(tempfile.mkdtemp(prefix="jobd-fuzz-"))
INPUT = BOX / "input"
DEST = BOX / "dest"


def seeds() -> list[bytes]:
    """Small valid archives of each kind the reader handles."""
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("run.sh", "#!/bin/sh\necho hi\n")
        zf.writestr("data/a.txt", "a" * 100)
        link = zipfile.ZipInfo("data/link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "a.txt")
        zf.writestr("empty/", "")
    out = [zipped.getvalue()]
    for mode in ("w", "w:gz"):
        tarred = io.BytesIO()
        with tarfile.open(fileobj=tarred, mode=mode) as tf:
            for name, content in (("run.sh", b"#!/bin/sh\n"), ("d/x", b"xyz" * 20)):
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tf.addfile(info, io.BytesIO(content))
            hard = tarfile.TarInfo("d/hard")
            hard.type, hard.linkname = tarfile.LNKTYPE, "d/x"
            tf.addfile(hard)
            sym = tarfile.TarInfo("d/sym")
            sym.type, sym.linkname = tarfile.SYMTYPE, "x"
            tf.addfile(sym)
        out.append(tarred.getvalue())
    return out


def outside_dest() -> list[str]:
    """Anything in the box but the input, the destination and the seeds: an escape."""
    return sorted(name for name in os.listdir(BOX) if name not in ("input", "dest", "seeds"))


def test_one_input(data: bytes) -> None:
    INPUT.write_bytes(data)
    try:
        kind = archive.detect(INPUT)
        if kind == "zip":
            archive.check_zip(INPUT, LIMITS, None)
        archive.extract(INPUT, DEST, LIMITS)
    except archive.ArchiveError:
        pass  # the one expected refusal
    finally:
        stray = outside_dest()
        if DEST.exists():
            shutil.rmtree(DEST)
        if stray:
            raise AssertionError(f"written outside the destination: {stray}")


def main() -> None:
    seed_dir = BOX / "seeds"  # after any corpus directory given: new inputs go to that one
    seed_dir.mkdir()
    for number, seed in enumerate(seeds()):
        (seed_dir / f"seed{number}").write_bytes(seed)
    atheris.Setup([*sys.argv, str(seed_dir)], test_one_input)
    try:
        atheris.Fuzz()
    finally:
        shutil.rmtree(BOX, ignore_errors=True)


if __name__ == "__main__":
    main()
