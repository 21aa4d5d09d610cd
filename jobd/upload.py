"""Streaming the classic upload body to disk.

A classic upload is one JSON object whose `input` member holds the base64 of a zip, and the
body can be a gigabyte: `ClassicBodyScanner` parses the object incrementally, keeps only the
small members in memory and decodes the `input` string straight into a file. Any chunking of
the body gives the same result, so the scanner can be fed whatever the ASGI server hands over.

Decisions:
- A UTF-8 byte order mark before the object is ignored: RFC 8259 allows parsers to ignore it,
  and Windows tools (PowerShell 5 `Set-Content -Encoding UTF8`) write one.
- The `input` string is strict JSON (raw newlines, tabs and CRs inside it are refused, as the
  classic daemon's Go decoder refused them); other raw control characters reach the base64
  decoder, which refuses them as "unexpected character".
- Offsets in JSON errors count bytes of the body; offsets in base64 errors count characters of
  the `input` string after JSON unescaping (the position in what `base64 files.zip` printed).
"""

from __future__ import annotations

import binascii
import json
import re
from typing import Any, BinaryIO

__all__ = ["Base64Decoder", "ClassicBodyScanner", "UploadError"]

_READING = "error reading job from request: "

_B64_SPACE = b"\r\n \t"
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_REFUSED = re.compile(rb"[^A-Za-z0-9+/=\r\n \t]")
_B64_NOT_PAD = re.compile(rb"[^=\r\n \t]")


class UploadError(ValueError):
    """The upload body is unusable; the message is written for the client (a 400 answer)."""


def _show(byte: int) -> str:
    """A byte quoted for an error message: printable ASCII as itself, anything else escaped."""
    return repr(chr(byte)) if byte < 0x80 else f"'\\x{byte:02x}'"


class Base64Decoder:
    """Incremental base64 decoding of text that arrives in arbitrary pieces.

    Whitespace (what `base64` prints every 76 columns, CRLF too) is ignored anywhere; anything
    outside the standard alphabet is an error, so a damaged upload is refused at once instead
    of becoming a damaged zip. Only complete 4-character groups are decoded, with binascii, so
    a chunk costs a whitespace strip and the decoding, both in C, and no Python loop: the
    alphabet is checked by the decoded length (lenient binascii skips what is not base64,
    which shortens its output), and a regex finds the culprit only when that check fails.
    """

    def __init__(self) -> None:
        self.offset = 0  # characters fed so far: positions in error messages
        self.size = 0  # bytes decoded so far
        self._pending = b""  # alphabet characters of an incomplete group
        self._pad = 0  # '=' seen so far; once non-zero only more '=' may follow

    def feed(self, data: bytes) -> bytes:
        """Decode what `data` completes; keep an incomplete group for the next call."""
        if not data:
            return b""
        start = self.offset
        self.offset += len(data)
        chars = data
        if b"\n" in data or b"\r" in data or b" " in data or b"\t" in data:
            chars = data.translate(None, _B64_SPACE)
        if self._pad or b"=" in chars:
            return self._padding(data, start)
        return self._decode(chars, data, start)

    def finish(self) -> bytes:
        """Decode the last group; its padding may be missing (some encoders drop it)."""
        left = len(self._pending)
        if left == 1:
            raise self._error("truncated input (a lone character in the last group)", self.offset)
        if not left:
            return b""
        group = self._pending + b"=" * (4 - left)
        self._pending = b""
        out = binascii.a2b_base64(group)  # validated characters: cannot fail
        self.size += len(out)
        return out

    def _decode(self, chars: bytes, data: bytes, start: int) -> bytes:
        """Decode the complete groups of pending + chars, all alphabet characters or else."""
        if self._pending:
            chars = self._pending + chars
        whole = len(chars) & ~3
        self._pending = chars[whole:]
        out = b""
        if whole:
            try:
                out = binascii.a2b_base64(memoryview(chars)[:whole])
            except binascii.Error:  # skipped characters left a partial group
                self._refuse(data, start)
            if len(out) * 4 != whole * 3:
                self._refuse(data, start)
        if self._pending.translate(None, _B64_ALPHABET):
            self._refuse(data, start)
        self.size += len(out)
        return out

    def _refuse(self, data: bytes, start: int) -> None:
        """Name the first character of `data` outside the alphabet (pending ones were checked)."""
        bad = _B64_REFUSED.search(data)
        assert bad is not None, "base64 length check failed without a bad character"
        at = bad.start()
        raise self._error(f"unexpected character {_show(data[at])}", start + at)

    def _padding(self, data: bytes, start: int) -> bytes:
        """The end of the text: '=' only where the last group ends, then only whitespace.

        Problems are reported in text order, so every chunking names the same one.
        """
        bad = _B64_REFUSED.search(data)
        valid = data if bad is None else data[:bad.start()]
        out = b""
        eq = 0 if self._pad else valid.find(b"=")
        if eq < 0:  # the first '=' lies beyond a bad character
            out = self._decode(valid.translate(None, _B64_SPACE), valid, start)
        else:
            if not self._pad:
                out = self._decode(valid[:eq].translate(None, _B64_SPACE), valid, start)
                if len(self._pending) < 2:
                    raise self._error("unexpected padding", start + eq)
            tail = valid[eq:]
            after = _B64_NOT_PAD.search(tail)
            run = tail if after is None else tail[:after.start()]
            self._count_padding(run, start + eq)
            if after is not None:
                raise self._error("data after padding", start + eq + after.start())
        if bad is not None:
            raise self._error(f"unexpected character {_show(data[bad.start()])}",
                              start + bad.start())
        return out

    def _count_padding(self, run: bytes, offset: int) -> None:
        """Count the '=' of `run` (at `offset`); refuse any beyond the last group's end."""
        before = self._pad
        self._pad += run.count(b"=")
        allowed = 4 - len(self._pending)
        if self._pad <= allowed:
            return
        at = -1
        for _ in range(allowed - before + 1):  # at most 3 steps: the first '=' too many
            at = run.find(b"=", at + 1)
        raise self._error("unexpected padding", offset + at)

    @staticmethod
    def _error(what: str, offset: int) -> UploadError:
        return UploadError(f"input is not valid base64: {what} at offset {offset}")


# Parser states of ClassicBodyScanner.
_BOM_STATE, _BEGIN, _FIRST_KEY, _KEY_START, _KEY, _COLON, _VALUE, _STREAM, _RAW, _AFTER, _DONE = (
    range(11))

_BOM = b"\xef\xbb\xbf"
_WS = re.compile(rb"[ \t\r\n]*")
_STRING_STOP = re.compile(rb'["\\]')
_CONTAINER_STOP = re.compile(rb'["\\{}\[\]]')
_SCALAR = re.compile(rb"[A-Za-z0-9+.\-]*")
_SCALAR_START = b"-0123456789tfn"
_HARD_ESCAPE = re.compile(rb"\\(?:[^nrt/]|\Z)")  # an escape the fast path does not rewrite
_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b",
            ord("f"): b"\f", ord('"'): b'"', ord("\\"): b"\\", ord("/"): b"/"}
_HEX = frozenset(b"0123456789abcdefABCDEF")
_QUOTE, _BACKSLASH, _OPEN_BRACE, _CLOSE_BRACE = ord('"'), ord("\\"), ord("{"), ord("}")


class ClassicBodyScanner:
    """Incremental parser of one JSON object that streams one string member to a file.

    Feed the body in chunks of any size, then call `finish()`, which returns every other
    member (keys lower-cased, values parsed with `json`). The member named `stream_key`
    (matched case-insensitively) must be a string: it is unescaped and base64-decoded into
    `sink` as it arrives, never held in memory. Afterwards `found_input` says whether that
    member was present and `input_size` how many bytes were written to `sink`.

    Small members are buffered, each up to `max_field` bytes of JSON text and all of them
    together up to `max_total`, and containers may nest `max_depth` levels (the object
    itself counts as one), so no body can make the scanner use much memory or recursion.
    `\\u` escapes in the streamed string cost a Python step each, so at most `max_escapes`
    are accepted (base64 needs none; Gson writes '=' as `\\u003d`): a body of them cannot
    hold the event loop for minutes.
    Errors raise UploadError; after one, every call raises it again. On error `sink` holds
    a partial file the caller should delete.
    """

    def __init__(self, sink: BinaryIO, *, stream_key: str = "input", max_field: int = 65536,
                 max_depth: int = 32, max_total: int = 1 << 20,
                 max_escapes: int = 65536) -> None:
        self.found_input = False
        self.input_size = 0
        self._sink = sink
        self._stream_key = stream_key.lower()
        self._max_field = max_field
        self._max_depth = max_depth
        self._max_total = max_total
        self._max_escapes = max_escapes
        self._fields: dict[str, Any] = {}
        self._state = _BOM_STATE
        self._bom = 0  # bytes of the byte order mark seen so far
        self._base = 0  # body offset of the current chunk's first byte
        self._error: UploadError | None = None
        self._kept = 0  # bytes of keys and small values buffered so far
        # the member being read
        self._key = ""
        self._streams = False  # the current key is the stream key
        self._buf = bytearray()  # JSON text of the current key or small value
        self._start = 0  # body offset where that text starts
        self._in_string = False
        self._escaped = False
        self._depth = 0  # containers open inside the current small value
        self._scalar = False
        # the streamed string
        self._decoder: Base64Decoder | None = None
        self._escape = b""  # an escape sequence split across chunks
        self._escape_at = 0
        self._u_escapes = 0

    # -- public -------------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        """Consume the next piece of the body."""
        if self._error is not None:
            raise self._error
        try:
            self._feed(bytes(chunk))
        except UploadError as exc:
            self._error = exc
            raise

    def finish(self) -> dict[str, Any]:
        """The other members, once the body ended exactly after the object."""
        if self._error is not None:
            raise self._error
        if self._state != _DONE:
            self._error = UploadError(_READING + "unexpected end of JSON input")
            raise self._error
        return dict(self._fields)

    # -- the state machine --------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            state = self._state
            if state == _STREAM:
                i = self._stream(data, i)
                continue
            if state == _RAW:
                i = self._raw(data, i)
                continue
            if state == _KEY:
                i = self._key_text(data, i)
                continue
            if state == _BOM_STATE:
                i = self._skip_bom(data, i)
                continue
            i = _WS.match(data, i).end()
            if i >= n:
                break
            c = data[i]
            if state == _BEGIN:
                if c != _OPEN_BRACE:
                    if c in b'["' + _SCALAR_START:
                        raise UploadError(_READING + "body is not a JSON object")
                    raise self._invalid(data, i, "looking for beginning of value")
                self._state = _FIRST_KEY
                i += 1
            elif state in (_FIRST_KEY, _KEY_START):
                if c == _CLOSE_BRACE and state == _FIRST_KEY:
                    self._state = _DONE
                    i += 1
                elif c == _QUOTE:
                    self._begin_text(i)
                    self._open_string()
                    self._state = _KEY
                    i += 1
                else:
                    raise self._invalid(data, i, "looking for beginning of object key string")
            elif state == _COLON:
                if c != ord(":"):
                    raise self._invalid(data, i, "after object key")
                self._state = _VALUE
                i += 1
            elif state == _VALUE:
                i = self._begin_value(data, i)
            elif state == _AFTER:
                if c == ord(","):
                    self._state = _KEY_START
                elif c == _CLOSE_BRACE:
                    self._state = _DONE
                else:
                    raise self._invalid(data, i, "after object key:value pair")
                i += 1
            else:  # _DONE
                raise self._invalid(data, i, "after top-level value")
        self._base += n

    def _skip_bom(self, data: bytes, i: int) -> int:
        """Skip a UTF-8 byte order mark before the object (see the module notes)."""
        n = len(data)
        while i < n and self._bom < 3 and data[i] == _BOM[self._bom]:
            self._bom += 1
            i += 1
        if self._bom == 3 or (i < n and self._bom == 0):
            self._state = _BEGIN
        elif i < n:  # a partial mark followed by something else
            raise UploadError(_READING + f"invalid character {_show(_BOM[0])} looking for "
                              "beginning of value at offset 0")
        return i

    def _invalid(self, data: bytes, i: int, context: str) -> UploadError:
        return UploadError(_READING + f"invalid character {_show(data[i])} {context} "
                           f"at offset {self._base + i}")

    # -- keys and small values ----------------------------------------------------------------

    def _begin_text(self, i: int) -> None:
        self._buf = bytearray()
        self._start = self._base + i
        self._in_string = False
        self._escaped = False
        self._depth = 0
        self._scalar = False

    def _open_string(self) -> None:
        self._append(b'"')
        self._in_string = True

    def _append(self, piece: bytes) -> None:
        self._buf += piece
        if len(self._buf) > self._max_field:
            what = f"member {self._key!r}" if self._state == _RAW else "an object key"
            raise UploadError(_READING + f"{what} at offset {self._start} is longer than "
                              f"{self._max_field} bytes")

    def _string_text(self, data: bytes, i: int) -> int:
        """Buffer string text up to and including its closing quote (then clear _in_string)."""
        n = len(data)
        while i < n:
            if self._escaped:  # the character after a backslash: json checks it later
                self._append(data[i:i + 1])
                self._escaped = False
                i += 1
                continue
            stop = _STRING_STOP.search(data, i)
            if stop is None:
                self._append(data[i:])
                return n
            j = stop.start()
            self._append(data[i:j + 1])
            i = j + 1
            if data[j] == _BACKSLASH:
                self._escaped = True
            else:
                self._in_string = False
                return i
        return n

    def _key_text(self, data: bytes, i: int) -> int:
        i = self._string_text(data, i)
        if self._in_string:
            return i
        key = self._parse(bytes(self._buf), "object key")
        self._keep(len(self._buf))
        self._streams = key.lower() == self._stream_key
        if self._streams:
            if self.found_input:
                raise UploadError(_READING + f"duplicate key {key!r} at offset {self._start}")
            self.found_input = True
        self._key = key
        self._state = _COLON
        return i

    def _begin_value(self, data: bytes, i: int) -> int:
        c = data[i]
        if self._streams:
            if c != _QUOTE:
                raise UploadError(f"{self._stream_key} must be a base64 string")
            self._decoder = Base64Decoder()
            self._state = _STREAM
            return i + 1
        self._begin_text(i)
        self._state = _RAW
        if c == _QUOTE:
            self._open_string()
            return i + 1
        if c in b"[{":
            self._append(data[i:i + 1])
            self._open()
            return i + 1
        if c not in _SCALAR_START:
            raise self._invalid(data, i, "looking for beginning of value")
        self._scalar = True
        return i

    def _open(self) -> None:
        """One more container inside the current value (the object itself is level 1)."""
        self._depth += 1
        if self._depth + 1 > self._max_depth:
            raise UploadError(_READING + f"member {self._key!r} nests deeper than "
                              f"{self._max_depth} levels")

    def _raw(self, data: bytes, i: int) -> int:
        """Buffer a small value's JSON text until it is complete, then parse it."""
        n = len(data)
        while i < n:
            if self._in_string:
                i = self._string_text(data, i)
                if not self._in_string and self._depth == 0:
                    return self._value_done(i)
            elif self._scalar:
                end = _SCALAR.match(data, i).end()
                self._append(data[i:end])
                if end == n:
                    return n
                return self._value_done(end)
            else:
                stop = _CONTAINER_STOP.search(data, i)
                if stop is None:
                    self._append(data[i:])
                    return n
                j = stop.start()
                c = data[j]
                self._append(data[i:j + 1])
                i = j + 1
                if c == _QUOTE:
                    self._in_string = True
                elif c in b"[{":
                    self._open()
                elif c in b"]}":
                    self._depth -= 1
                    if self._depth == 0:
                        return self._value_done(i)
        return n

    def _value_done(self, i: int) -> int:
        text = bytes(self._buf)
        self._keep(len(text))
        self._fields[self._key.lower()] = self._parse(text, f"value of {self._key!r}")
        self._buf = bytearray()
        self._state = _AFTER
        return i

    def _keep(self, size: int) -> None:
        """Bound the memory all small members take together."""
        self._kept += size
        if self._kept > self._max_total:
            raise UploadError(_READING + f"the members other than {self._stream_key!r} are "
                              f"longer than {self._max_total} bytes")

    def _parse(self, text: bytes, what: str) -> Any:
        """Parse buffered JSON text: strict UTF-8, no NaN or Infinity (not JSON)."""
        try:
            decoded = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UploadError(_READING + f"invalid UTF-8 in {what} at offset "
                              f"{self._start + exc.start}") from exc
        try:
            return json.loads(decoded, parse_constant=_not_json)
        except json.JSONDecodeError as exc:
            at = self._start + len(decoded[:exc.pos].encode("utf-8"))
            detail = re.sub(r"( starting)? at$", "", exc.msg)  # the offset is said already
            raise UploadError(_READING + f"invalid {what} at offset {at}: {detail}") from exc
        except ValueError as exc:  # NaN, Infinity, an integer too long to convert
            raise UploadError(_READING + f"invalid {what} at offset {self._start}: "
                              f"{exc}") from exc

    # -- the streamed string ------------------------------------------------------------------

    def _stream(self, data: bytes, i: int) -> int:
        """Unescape and decode the streamed string; leave _STREAM after its closing quote.

        The common jq output has a `\\n` every 77 bytes: `_plain` rewrites those, `\\r`, `\\t`
        and `\\/` with C calls on whole segments. Any other escape (a `\\u`, an escaped
        quote, a `\\\\` pair, or one split by the chunking) goes to `_resume_escape`; after
        the first, the rest of the chunk is searched for such escapes with a regex, so a chunk
        full of them stays linear.
        """
        n = len(data)
        if self._escape:
            i = self._resume_escape(data, i)
        quote = -1
        careful = False
        while i < n:
            if quote < i:  # first time, or the quote found was escaped
                quote = data.find(b'"', i)
                if quote < 0:
                    quote = n  # no closing quote in this chunk
            if not careful:
                seg = data[i:quote]
                text = _soft_unescape(seg) if b"\\" in seg else seg
                if b"\\" in text:
                    careful = True
                else:
                    self._plain(seg, text, i)
                    i = quote
            if careful:
                hard = _HARD_ESCAPE.search(data, i, quote)
                stop = quote if hard is None else hard.start()
                if stop > i:
                    seg = data[i:stop]
                    self._plain(seg, _soft_unescape(seg), i)
                i = stop
                if hard is not None:
                    self._escape_at = self._base + i
                    i = self._resume_escape(data, i)
                    continue
            if i < n:  # at the closing quote
                self._write(self._decoder_().finish())
                self._state = _AFTER
                return i + 1
        return n

    def _plain(self, seg: bytes, text: bytes, pos: int) -> None:
        """Decode `text`, the unescaped `seg` at chunk offset `pos`, after a JSON check.

        A raw line break or tab is refused where it stands, after decoding what precedes
        it: an earlier base64 error is the one to report, whatever the chunking.
        """
        raw = [at for at in (seg.find(b"\n"), seg.find(b"\r"), seg.find(b"\t")) if at >= 0]
        if raw:
            at = min(raw)
            self._write(self._decoder_().feed(_soft_unescape(seg[:at])))
            raise UploadError(_READING + f"invalid character {_show(seg[at])} in string "
                              f"literal at offset {self._base + pos + at}")
        self._write(self._decoder_().feed(text))

    def _resume_escape(self, data: bytes, i: int) -> int:
        """Collect one escape sequence (it may arrive a byte at a time) and decode it."""
        n = len(data)
        need = 6 if self._escape[1:2] == b"u" else 2
        while i < n and len(self._escape) < need:
            self._escape += data[i:i + 1]
            i += 1
            if len(self._escape) == 2 and self._escape[1:2] == b"u":
                need = 6
        if len(self._escape) < need:
            return i
        kind = self._escape[1]
        if kind == ord("u"):
            self._u_escapes += 1
            if self._u_escapes > self._max_escapes:
                raise UploadError(_READING + f"more than {self._max_escapes} \\u escapes in "
                                  f"{self._stream_key!r}")
            for k, digit in enumerate(self._escape[2:6]):
                if digit not in _HEX:
                    raise UploadError(_READING + f"invalid character {_show(digit)} in \\u "
                                      f"hexadecimal character escape at offset "
                                      f"{self._escape_at + 2 + k}")
            char = chr(int(self._escape[2:6], 16)).encode("utf-8", "surrogatepass")
        elif kind in _ESCAPES:
            char = _ESCAPES[kind]
        else:
            raise UploadError(_READING + f"invalid character {_show(kind)} in string escape "
                              f"code at offset {self._escape_at + 1}")
        self._escape = b""
        self._write(self._decoder_().feed(char))
        return i

    def _decoder_(self) -> Base64Decoder:
        assert self._decoder is not None
        return self._decoder

    def _write(self, out: bytes) -> None:
        if out:
            self._sink.write(out)
            self.input_size += len(out)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _soft_unescape(seg: bytes) -> bytes:
    """Rewrite the escapes base64 text can legitimately carry (see `_stream`).

    split/join beats bytes.replace here: jq puts a `\\n` every 77 bytes.
    """
    text = b"\n".join(seg.split(b"\\n"))
    if b"\\" in text:
        text = text.replace(b"\\r", b"\r").replace(b"\\t", b"\t").replace(b"\\/", b"/")
    return text
