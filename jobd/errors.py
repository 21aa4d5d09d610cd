"""The one error shape, for answers given outside a protocol's routes (middleware, handlers).

`{"error": "<code>", "message": "<what is wrong>", "status": <http status>}` is what the classic
jobd answers and what every jobd protocol uses (ARCHITECTURE.md), so a client that reads one
error reads them all, whichever layer refused the request.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
         408: "request_timeout", 409: "conflict", 413: "payload_too_large",
         414: "uri_too_long", 431: "request_header_fields_too_large",
         429: "too_many_requests", 503: "service_unavailable", 507: "insufficient_storage"}


def error(status: int, message: str, *, code: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    """An error answer in the shared shape (`code` defaults from the status)."""
    kind = code or CODES.get(status, "bad_request")
    return JSONResponse({"error": kind, "message": message, "status": status}, status,
                        headers=headers)


def error_bytes(status: int, message: str) -> bytes:
    """The body of `error`, for code that writes raw HTTP (the connection layer)."""
    return bytes(error(status, message).body)
