"""Responses Failgate makes itself: a JSON body with a fixed error code, never a traceback."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
from aiohttp import web

_REASONS = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    413: "payload_too_large", 414: "uri_too_long", 429: "rate_limited", 431: "request_header_fields_too_large",
    501: "not_implemented", 502: "upstream_unavailable", 504: "upstream_timeout", 505: "http_version_not_supported",
}


class ErrorBody(msgspec.Struct):
    error: str
    detail: str
    route: str | None
    request_id: str


_encode = msgspec.json.Encoder().encode


def error_response(
    status: int,
    detail: str,
    *,
    route: str | None,
    request_id: str,
    request_id_header: str,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = _encode(ErrorBody(code or _REASONS.get(status, "error"), detail, route, request_id))
    resp = web.Response(status=status, body=body, content_type="application/json")
    resp.headers[request_id_header] = request_id
    if headers:
        resp.headers.update(headers)
    return resp
