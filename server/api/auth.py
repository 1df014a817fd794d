"""Who may call what: the inference key for every route that shows or uses adapters, the admin key (or, without
one, the loopback address) for the routes that change the store."""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import Request
from pydantic import SecretStr

from loraswap.server.api.errors import APIError
from loraswap.server.settings import Settings


def has_key(request: Request, key: SecretStr | None) -> bool:
    """Whether the request carries 'Authorization: Bearer <key>' (compared in constant time)."""
    if key is None:
        return False
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {key.get_secret_value()}".encode())


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def authorize(request: Request, settings: Settings, admin: bool = False) -> None:
    """Raise 401 (no or a wrong key) or 403 (an admin route from elsewhere than loopback, without an admin key).

    Inference routes need the API key when one is set (the admin key opens them too). Admin routes need the admin
    key when one is set; without one they are open to the loopback address only."""
    if admin:
        if settings.admin_key is not None:
            if not has_key(request, settings.admin_key):
                raise APIError(
                    401,
                    "admin routes need 'Authorization: Bearer <admin key>'",
                    "authentication_error",
                    code="invalid_api_key",
                )
            return
        # Behind a reverse proxy on this host, uvicorn takes the caller from X-Forwarded-For (it trusts the
        # header from 127.0.0.1 only), so remote callers are seen as remote.
        host = request.client.host if request.client else ""
        if not is_loopback(host):
            raise APIError(
                403,
                "adapter upload and delete are only accepted from the loopback address "
                "unless LORASWAP_ADMIN_KEY is set",
                "permission_error",
            )
        return
    if settings.api_key is not None and not (
        has_key(request, settings.api_key) or has_key(request, settings.admin_key)
    ):
        raise APIError(
            401,
            "this server needs 'Authorization: Bearer <api key>'",
            "authentication_error",
            code="invalid_api_key",
        )
