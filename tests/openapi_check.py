"""Checks HTTP answers against the OpenAPI document the daemon serves.

conftest.py hooks `OpenApiChecker.check_response` into every Daemon client, so each JSON answer
any test receives from a documented route (or from under /api/v1) is validated against the
response schema documented for its method, path and status; a status or media type the
document does not list fails the test that received it.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import httpx
from jsonschema import Draft202012Validator, FormatChecker

_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
_FORMATS = FormatChecker()


@_FORMATS.checks("date-time")
def _is_date_time(value: object) -> bool:
    return not isinstance(value, str) or _RFC3339.fullmatch(value) is not None


#: (method, path template, status) -> how many answers were checked, over the whole session.
CHECKED: Counter[tuple[str, str, int]] = Counter()


class OpenApiChecker:
    def __init__(self, document: dict[str, Any]) -> None:
        Draft202012Validator.check_schema({"$defs": document["components"]["schemas"]})
        self.document = document
        self.templates: list[tuple[re.Pattern[str], str]] = []
        for template in document["paths"]:
            pattern = re.sub(r"\\\{path\\\}", "(?P<path>.+)", re.escape(template))
            pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", pattern)
            self.templates.append((re.compile(pattern), template))

    def find(self, path: str) -> str | None:
        for pattern, template in self.templates:
            if pattern.fullmatch(path):
                return template
        return None

    def validate(self, schema: dict[str, Any], value: Any, where: str) -> None:
        root = {**schema, "components": self.document["components"]}
        errors = sorted(Draft202012Validator(root, format_checker=_FORMATS).iter_errors(value),
                        key=lambda e: list(e.absolute_path))
        if errors:
            details = "; ".join(f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: "
                                f"{e.message[:300]}" for e in errors[:5])
            raise AssertionError(f"{where}: answer does not match the OpenAPI schema: {details}")

    def error_schema(self) -> dict[str, Any]:
        return {"$ref": "#/components/schemas/Error"}

    def check(self, method: str, path: str, status: int, media: str, body: bytes) -> None:
        method = method.lower()
        where = f"{method.upper()} {path} -> {status}"
        template = self.find(path)
        is_json = media == "application/json"
        if template is None:
            if not path.startswith("/api/v1"):
                return  # not ours to check (routes of other protocols)
            assert status in (404, 405), f"{where}: the route is not in the OpenAPI document"
            assert is_json, f"{where}: errors must be JSON"
            self.validate(self.error_schema(), httpx.Response(200, content=body).json(), where)
            CHECKED[(method, "(unknown route)", status)] += 1
            return
        operations = self.document["paths"][template]
        operation = operations.get("get" if method == "head" else method)
        if operation is None:
            assert status == 405, f"{where}: method not documented for {template}"
            self.validate(self.error_schema(), httpx.Response(200, content=body).json(), where)
            CHECKED[(method, template, status)] += 1
            return
        response = operation["responses"].get(str(status))
        assert response is not None, \
            f"{where}: status {status} is not documented for {method.upper()} {template}"
        CHECKED[(method, template, status)] += 1
        content = response.get("content")
        if content is None:
            assert not body, f"{where}: documented without a body, but got {len(body)} bytes"
            return
        if method == "head":
            return
        if media not in content and "*/*" not in content:
            raise AssertionError(f"{where}: media type {media!r} is not documented "
                                 f"(documented: {', '.join(content)})")
        if is_json:
            schema = content["application/json"]["schema"]
            self.validate(schema, httpx.Response(200, content=body).json(), where)

    def check_response(self, response: httpx.Response) -> None:
        """httpx response hook: reads JSON bodies (never streams of other types)."""
        media = response.headers.get("content-type", "").split(";")[0].strip().lower()
        request = response.request
        if media == "application/json" or not response.headers.get("content-type"):
            body = response.read()
        else:
            body = b""  # a log stream or a download: its media type is checked, not its body
        self.check(request.method, request.url.path, response.status_code, media, body)
