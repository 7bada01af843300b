"""`Authorization: Bearer <api key>` for the DRF API (the gateway checks keys itself, asynchronously)."""

from __future__ import annotations

from rest_framework import authentication, exceptions

from gateway_app.models import ApiKey


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class ApiKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            return None
        user = ApiKey.user_for(token)
        if user is None:
            raise exceptions.AuthenticationFailed("Invalid API key.")
        return user, token

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'
