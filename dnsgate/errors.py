"""The one error type a caller of the API is answered with.

`ApiError` is a request dnsgate refuses: an HTTP status, a stable code a client can test, a message
a person can read, and the field at fault. The API's parsing raises it for bad input and the consent
service for a change its rules refuse; `errors_as_json` (http/consent_api.py) answers every one the
same way. Base layer: the consent service raises it without knowing about HTTP servers.
"""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
