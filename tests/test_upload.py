"""The classic upload body scanner and the streaming base64 decoder: pure, no server."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobd.upload import Base64Decoder, ClassicBodyScanner, UploadError

PAYLOAD = bytes(range(256)) * 40 + b"PK\x03\x04 the end"


def jq_body(job_id: str, data: bytes, **extra: Any) -> bytes:
    """What `jq -n --arg id ... --arg input "$(base64 files.zip)" '{id: $id, input: $input}'`
    sends: base64 wrapped at 76 columns, each newline escaped as \\n (jq strips the last)."""
    wrapped = base64.encodebytes(data).decode().rstrip("\n")
    return json.dumps({"id": job_id, "input": wrapped, **extra}).encode()


def scan(body: bytes, chunks: list[int] | None = None,
         **options: Any) -> tuple[dict[str, Any], bytes, ClassicBodyScanner]:
    """Feed `body` cut at the given chunk sizes (cycled; default one piece)."""
    sink = io.BytesIO()
    scanner = ClassicBodyScanner(sink, **options)
    sizes = chunks or [len(body) or 1]
    pos = k = 0
    while pos < len(body):
        size = max(1, sizes[k % len(sizes)])
        scanner.feed(body[pos:pos + size])
        pos += size
        k += 1
    fields = scanner.finish()
    return fields, sink.getvalue(), scanner


def refused(body: bytes, chunks: list[int] | None = None, **options: Any) -> str:
    with pytest.raises(UploadError) as info:
        scan(body, chunks, **options)
    return str(info.value)


def decode_all(pieces: list[bytes]) -> bytes:
    decoder = Base64Decoder()
    out = [decoder.feed(piece) for piece in pieces]
    out.append(decoder.finish())
    return b"".join(out)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


# -- Base64Decoder ----------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"a", b"ab", b"abc", b"abcd", PAYLOAD])
def test_decoder_round_trips_every_padding_length(data: bytes) -> None:
    assert decode_all([base64.b64encode(data)]) == data
    assert decode_all([base64.encodebytes(data)]) == data
    assert decode_all([base64.b64encode(data).rstrip(b"=")]) == data  # padding may be missing


def test_decoder_ignores_crlf_spaces_and_tabs_anywhere() -> None:
    text = base64.b64encode(PAYLOAD)
    messy = b"\r\n".join(text[i:i + 5] for i in range(0, len(text), 5))
    messy = b" \t" + messy.replace(b"A", b"A ") + b"\r\n"
    assert decode_all([messy]) == PAYLOAD
    assert decode_all([bytes([b]) for b in messy]) == PAYLOAD


def test_decoder_empty_input_is_empty() -> None:
    assert decode_all([]) == b""
    assert decode_all([b"", b"\n", b""]) == b""


@pytest.mark.parametrize(("text", "char", "offset"), [
    (b"QUJD!EFG", "'!'", 4),
    (b"QUJDREVG\n-abc", "'-'", 9),
    (b"QUJD_EFG", "'_'", 4),  # url-safe alphabet is not accepted
    (b"QU\xc3\xa9JD", "'\\xc3'", 2),
    (b"QUJD\x00", "'\\x00'", 4),
    (b"QUJ\x0bD", "'\\x0b'", 3),  # vertical tab is not whitespace here
    (b"QUJDRE\"", "'\"'", 6),
])
def test_decoder_names_the_first_bad_character(text: bytes, char: str, offset: int) -> None:
    for pieces in ([text], [bytes([b]) for b in text]):
        with pytest.raises(UploadError) as info:
            decode_all(pieces)
        assert str(info.value) == (f"input is not valid base64: unexpected character {char} "
                                   f"at offset {offset}")


@pytest.mark.parametrize(("text", "message"), [
    (b"QUI=QUJD", "data after padding at offset 4"),
    (b"QQ==\nQQ==", "data after padding at offset 5"),
    (b"QUJD=", "unexpected padding at offset 4"),
    (b"Q===", "unexpected padding at offset 1"),
    (b"QQ===", "unexpected padding at offset 4"),
    (b"QUI==", "unexpected padding at offset 4"),
    (b"QUJDR", "truncated input (a lone character in the last group) at offset 5"),
])
def test_decoder_refuses_misplaced_padding(text: bytes, message: str) -> None:
    for pieces in ([text], [bytes([b]) for b in text]):
        with pytest.raises(UploadError) as info:
            decode_all(pieces)
        assert str(info.value) == f"input is not valid base64: {message}"


@settings(deadline=None)  # timing varies on loaded CI machines
@given(st.binary(max_size=3000), st.lists(st.integers(min_value=0), max_size=12),
       st.sampled_from([b"\n", b"\r\n", b" ", b"\t"]), st.integers(min_value=1, max_value=90),
       st.booleans())
def test_decoder_property_any_wrapping_and_chunking(data: bytes, cuts: list[int], eol: bytes,
                                                    width: int, strip_padding: bool) -> None:
    text = base64.b64encode(data)
    if strip_padding:
        text = text.rstrip(b"=")
    wrapped = eol.join(text[i:i + width] for i in range(0, len(text), width))
    assert decode_all(split_at(wrapped, cuts)) == data


# -- ClassicBodyScanner: good bodies ----------------------------------------------------------


def test_jq_output_byte_for_byte() -> None:
    body = jq_body("my-job", PAYLOAD)
    assert b"\\n" in body  # the escaped line breaks jq writes
    fields, data, scanner = scan(body)
    assert fields == {"id": "my-job"}
    assert data == PAYLOAD
    assert scanner.found_input
    assert scanner.input_size == len(PAYLOAD)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 76, 77, 78, 4096])
def test_every_fixed_chunk_size_gives_the_same_result(size: int) -> None:
    body = jq_body("x", PAYLOAD, slurml=True, priority=3)
    assert scan(body, [size])[:2] == ({"id": "x", "slurml": True, "priority": 3}, PAYLOAD)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0), max_size=20),
       st.dictionaries(st.sampled_from(["id", "ID", "slurml", "note", "labels"]),
                       st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                                    lambda inner: st.lists(inner, max_size=3)
                                    | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                                    max_leaves=6), max_size=4),
       st.booleans())
def test_random_split_points_give_identical_output(data: bytes, cuts: list[int],
                                                   extra: dict[str, Any], indent: bool) -> None:
    document = {**extra, "Input": base64.encodebytes(data).decode()}
    body = json.dumps(document, indent=2 if indent else None, ensure_ascii=False).encode()
    expected = {k.lower(): v for k, v in extra.items()}
    sink = io.BytesIO()
    scanner = ClassicBodyScanner(sink)
    for piece in split_at(body, cuts):
        scanner.feed(piece)
    assert scanner.finish() == expected
    assert sink.getvalue() == data
    assert scanner.input_size == len(data)


def test_case_insensitive_keys() -> None:
    body = b'{"ID": "a", "Input": "' + base64.b64encode(b"zip") + b'", "SlurmL": false}'
    fields, data, scanner = scan(body)
    assert fields == {"id": "a", "slurml": False}
    assert data == b"zip"
    assert scanner.found_input


def test_stream_key_is_configurable() -> None:
    body = b'{"Payload": "' + base64.b64encode(b"zip") + b'", "input": 5}'
    fields, data, _ = scan(body, stream_key="payload")
    assert (fields, data) == ({"input": 5}, b"zip")


def test_nested_values_in_other_keys() -> None:
    other = {"labels": {"a": "b", "c": [1, 2.5, None, True, {"d": []}]},
             "x": "q\"\\\u00e9\U0001f600"}
    body = json.dumps({"id": "n", **other, "input": ""}).encode()
    for size in (1, 3, len(body)):
        fields, data, scanner = scan(body, [size])
        assert fields == {"id": "n", **other}
        assert data == b""
        assert scanner.found_input and scanner.input_size == 0


def test_missing_input_is_reported_not_refused() -> None:
    fields, data, scanner = scan(b'{"id": "x"}')
    assert fields == {"id": "x"} and data == b"" and not scanner.found_input
    assert scan(b"{}")[0] == {}


def test_whitespace_between_tokens_and_a_bom() -> None:
    body = (b'\xef\xbb\xbf \r\n\t{ "id" :\n"x" ,\t"input"\r\n:  "'
            + base64.b64encode(b"ab") + b'"  ,"n":[ 1 , 2 ] }\n \n')
    for size in (1, 2, len(body)):
        assert scan(body, [size])[:2] == ({"id": "x", "n": [1, 2]}, b"ab")


@pytest.mark.parametrize("escape", ["\\/", "\\u002F", "\\u002f"])
def test_escaped_slash(escape: str) -> None:
    text = base64.b64encode(b"\xff\xff\xff\xfe").decode()  # "////" then "/g=="
    assert "/" in text
    body = ('{"input": "' + text.replace("/", escape) + '"}').encode()
    for size in (1, 2, 5, len(body)):
        assert scan(body, [size])[1] == b"\xff\xff\xff\xfe"


def test_every_whitespace_escape_and_unicode_escapes() -> None:
    text = base64.b64encode(PAYLOAD[:300]).decode()
    spelled = {"=": "\\u003d", "A": "\\u0041"}  # Gson writes '=' as \u003d
    mixed = "".join(spelled.get(c, c) + ["\\n", "\\r\\n", "\\t", " ", "\\u0020", "\\u000A",
                                         ""][i % 7] for i, c in enumerate(text))
    body = ('{"input": "' + mixed + '", "id": "u"}').encode()
    for size in (1, 2, 3, 4, 5, 6, 7, 64, len(body)):
        assert scan(body, [size])[:2] == ({"id": "u"}, PAYLOAD[:300])


@pytest.mark.parametrize("cut", range(1, 8))
def test_escapes_split_across_chunks(cut: int) -> None:
    body = b'{"input": "QUJD\\nREVG\\u0041\\u0041\\u003D\\u003d"}'
    pos = body.index(b"\\u0041")
    first, second = body[:pos + cut], body[pos + cut:]
    sink = io.BytesIO()
    scanner = ClassicBodyScanner(sink)
    scanner.feed(first)
    scanner.feed(second)
    scanner.finish()
    assert sink.getvalue() == base64.b64decode(b"QUJDREVGAA==")


def test_chunks_can_be_memoryviews_and_bytearrays() -> None:
    body = jq_body("m", PAYLOAD)
    sink = io.BytesIO()
    scanner = ClassicBodyScanner(sink)
    scanner.feed(memoryview(body)[:100])
    scanner.feed(bytearray(body[100:]))
    assert scanner.finish() == {"id": "m"}
    assert sink.getvalue() == PAYLOAD


def test_duplicate_other_keys_last_wins() -> None:
    assert scan(b'{"id": "a", "ID": "b"}')[0] == {"id": "b"}


# -- ClassicBodyScanner: refused bodies -------------------------------------------------------


@pytest.mark.parametrize(("body", "message"), [
    (b"", "unexpected end of JSON input"),
    (b"   ", "unexpected end of JSON input"),
    (b'{"id": "x", "input": "QUJD', "unexpected end of JSON input"),
    (b'{"id": "x"', "unexpected end of JSON input"),
    (b'{"id": "x",', "unexpected end of JSON input"),
    (b'{"id": tr', "unexpected end of JSON input"),
    (b'{"id": [1, {"a"', "unexpected end of JSON input"),
    (b'\xef\xbb', "unexpected end of JSON input"),
    (b"hello", "invalid character 'h' looking for beginning of value at offset 0"),
    (b"[1, 2]", "body is not a JSON object"),
    (b'"just a string"', "body is not a JSON object"),
    (b"42", "body is not a JSON object"),
    (b"null", "body is not a JSON object"),
    (b'{"id": "x"} x', "invalid character 'x' after top-level value at offset 12"),
    (b'{"id": "x"}{}', "invalid character '{' after top-level value at offset 11"),
    (b'{"id" "x"}', "invalid character '\"' after object key at offset 6"),
    (b'{"id": "x" "y": 1}', "invalid character '\"' after object key:value pair at offset 11"),
    (b'{"id": "x",}', "invalid character '}' looking for beginning of object key string "
                      "at offset 11"),
    (b"{id: 1}", "invalid character 'i' looking for beginning of object key string at offset 1"),
    (b'{"id": x}', "invalid character 'x' looking for beginning of value at offset 7"),
    (b'{"id": tru}', "invalid value of 'id' at offset 7: Expecting value"),
    (b'{"id": 01}', "invalid value of 'id' at offset 8: Extra data"),
    (b'{"id": NaN}', "invalid character 'N' looking for beginning of value at offset 7"),
    (b'{"id": -Infinity}', "invalid value of 'id' at offset 7: -Infinity is not JSON"),
    (b'{"id": [1}', "invalid value of 'id' at offset 9: Expecting ',' delimiter"),
    (b'{"id": "abc\\', "unexpected end of JSON input"),
    (b'{"id": "a\nb"}', "invalid value of 'id' at offset 9: Invalid control character"),
    (b'{"id": "\\x"}', "invalid value of 'id' at offset 8: Invalid \\escape"),
    (b'{"\\q": 1}', "invalid object key at offset 2: Invalid \\escape"),
    (b'{"id": "\xff"}', "invalid UTF-8 in value of 'id' at offset 8"),
    (b'\xef\xbb{}', "invalid character '\\xef' looking for beginning of value at offset 0"),
    (b'{"input": "QU\nJD"}', "invalid character '\\n' in string literal at offset 13"),
    (b'{"input": "QUJD\t"}', "invalid character '\\t' in string literal at offset 15"),
    (b'{"input": "QU\\qJD"}', "invalid character 'q' in string escape code at offset 14"),
    (b'{"input": "\\u00G1"}', "invalid character 'G' in \\u hexadecimal character escape "
                             "at offset 15"),
])
def test_malformed_json(body: bytes, message: str) -> None:
    for size in (1, len(body) or 1):
        assert refused(body, [size]) == f"error reading job from request: {message}"


def test_json_module_details_may_vary_by_python_version() -> None:
    message = refused(b'{"id": [1,]}')  # 3.13 says "Illegal trailing comma" at the comma
    assert message.startswith("error reading job from request: invalid value of 'id' at offset")


def test_top_level_array_even_with_input_inside() -> None:
    assert refused(b'[{"input": "QUJD"}]') == ("error reading job from request: "
                                               "body is not a JSON object")


@pytest.mark.parametrize("value", [b"null", b"123", b"true", b"[]", b'{"a": "QUJD"}', b"x"])
def test_input_must_be_a_string(value: bytes) -> None:
    assert refused(b'{"id": "a", "input": ' + value + b"}") == "input must be a base64 string"


def test_duplicate_input_key_in_any_case() -> None:
    body = b'{"input": "QUJD", "id": "x", "INPUT": "QUJD"}'
    for size in (1, len(body)):
        assert refused(body, [size]) == ("error reading job from request: duplicate key "
                                         "'INPUT' at offset 29")


@pytest.mark.parametrize(("text", "detail"), [
    (b"QUJD!", "unexpected character '!' at offset 4"),
    (b"QU\\\\JD", "unexpected character '\\\\' at offset 2"),
    (b"QU\\\"JD", "unexpected character '\"' at offset 2"),
    (b"QU\\bJD", "unexpected character '\\x08' at offset 2"),
    (b"QU\\u00e9JD", "unexpected character '\\xc3' at offset 2"),
    (b"QUJD\\nREVG\\n!", "unexpected character '!' at offset 10"),
    (b"QUI=QUJD", "data after padding at offset 4"),
    (b"QUI=\\n=", "unexpected padding at offset 5"),
    (b"QUJDR", "truncated input (a lone character in the last group) at offset 5"),
    (b"QUJD\x01", "unexpected character '\\x01' at offset 4"),
])
def test_invalid_base64_in_input(text: bytes, detail: str) -> None:
    body = b'{"input": "' + text + b'", "id": "x"}'
    for size in (1, 2, 3, len(body)):
        assert refused(body, [size]) == f"input is not valid base64: {detail}"


def test_oversize_field() -> None:
    body = json.dumps({"id": "x" * 100}).encode()
    assert refused(body, max_field=50) == ("error reading job from request: member 'id' at "
                                           "offset 7 is longer than 50 bytes")
    body = json.dumps({"k" * 100: 1}).encode()
    assert "an object key at offset 1 is longer than 50 bytes" in refused(body, max_field=50)
    body = json.dumps({"id": list(range(100))}).encode()
    assert "is longer than 50 bytes" in refused(body, [1], max_field=50)
    assert scan(json.dumps({"id": "x" * 40}).encode(), max_field=50)[0] == {"id": "x" * 40}


def test_many_small_fields_are_capped_together() -> None:
    body = json.dumps({f"k{i}": "v" * 50 for i in range(100)}).encode()
    assert "longer than 1000 bytes" in refused(body, max_total=1000)
    assert len(scan(body)[0]) == 100


def test_depth_bomb_is_refused_without_recursion() -> None:
    bomb = b'{"id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert refused(bomb, [4096]) == ("error reading job from request: member 'id' nests "
                                     "deeper than 32 levels")
    assert "nests deeper" in refused(b'{"a": ' + b'{"b": ' * 40 + b"1" + b"}" * 41)
    ok = b'{"a": ' + b"[" * 31 + b"]" * 31 + b"}"
    assert scan(ok)[0] == {"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}
    assert "nests deeper" in refused(b'{"a": ' + b"[" * 32 + b"]" * 32 + b"}")


def test_unicode_escape_flood_is_capped() -> None:
    body = b'{"input": "' + b"\\u0041" * 200 + b'"}'
    assert refused(body, max_escapes=100) == ("error reading job from request: more than 100 "
                                              "\\u escapes in 'input'")
    assert scan(body)[1] == base64.b64decode(b"A" * 200)


def test_errors_are_sticky() -> None:
    scanner = ClassicBodyScanner(io.BytesIO())
    with pytest.raises(UploadError):
        scanner.feed(b"[")
    with pytest.raises(UploadError, match="not a JSON object"):
        scanner.feed(b"{}")
    with pytest.raises(UploadError, match="not a JSON object"):
        scanner.finish()


def test_throughput_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    """Not asserted (machines differ): run with -s to read it."""
    data = os.urandom(48 << 20)  # 64 MiB of base64
    body = jq_body("perf", data)

    class Null:
        size = 0

        def write(self, piece: bytes) -> int:
            self.size += len(piece)
            return len(piece)

    sink = Null()
    scanner = ClassicBodyScanner(sink)  # type: ignore[arg-type]
    started = time.perf_counter()
    for pos in range(0, len(body), 65536):
        scanner.feed(body[pos:pos + 65536])
    scanner.finish()
    body_rate = len(body) / (time.perf_counter() - started) / 2**20
    text = base64.encodebytes(data)
    decoder = Base64Decoder()
    started = time.perf_counter()
    for pos in range(0, len(text), 65536):
        decoder.feed(text[pos:pos + 65536])
    decoder.finish()
    decode_rate = len(text) / (time.perf_counter() - started) / 2**20
    assert sink.size == decoder.size == len(data)
    with capsys.disabled():
        print(f"\n[upload throughput, 64 KiB chunks] scanner {body_rate:.0f} MiB/s of body, "
              f"decoder {decode_rate:.0f} MiB/s of base64")


def outcome(body: bytes, cuts: list[int]) -> tuple[Any, ...]:
    """What scanning `body` cut at `cuts` gives: fields and data, or the error message."""
    sink = io.BytesIO()
    scanner = ClassicBodyScanner(sink, max_field=64, max_depth=4, max_escapes=8)
    try:
        for piece in split_at(body, cuts):
            scanner.feed(piece)
        return ("ok", scanner.finish(), sink.getvalue(), scanner.found_input)
    except UploadError as exc:
        return ("error", str(exc))


def mutated(body: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    for at, insert in edits:
        at %= len(body) + 1
        body = body[:at] + insert + body[at + 1:]
    return body


TOKENS = st.sampled_from([b"{", b"}", b"[", b"]", b'"', b"\\", b":", b",", b" ", b"\n", b"\\u",
                          b"\\n", b"=", b"A", b"0", b"true", b"\xef\xbb\xbf", b"\xff", b"",
                          b"\x00"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.builds(mutated, st.just(jq_body("f", PAYLOAD[:100], n=[1, {"a": None}])),
                           st.lists(st.tuples(st.integers(min_value=0), TOKENS), max_size=4))),
       st.lists(st.integers(min_value=0), max_size=10))
def test_fuzz_any_body_any_chunking_same_outcome(body: bytes, cuts: list[int]) -> None:
    """Whatever the bytes, only UploadError escapes, and the chunking changes nothing."""
    assert outcome(body, cuts) == outcome(body, []) == outcome(body, list(range(len(body))))
