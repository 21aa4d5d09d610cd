"""Job payloads: zips holding a run.sh, as a client builds them."""

from __future__ import annotations

import io
import zipfile


def make_zip(files: dict[str, str | bytes], *, stored: bool = False) -> bytes:
    """A zip of `files` (name -> content), run.sh executable; `stored` skips compression."""
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, content in files.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            mode = 0o755 if name.endswith(".sh") else 0o644
            info.external_attr = (mode | 0o100000) << 16
            info.compress_type = method
            archive.writestr(info, content)
    return buffer.getvalue()
