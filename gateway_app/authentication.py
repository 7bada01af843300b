"""`Authorization: Bearer <api key>` for the DRF API (the gateway checks keys itself, asynchronously)."""

from __future__ import annotations

from rest_framework import authentication, exceptions, permissions

from gateway_app.models import ApiKey, KeyScope


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
        key = ApiKey.find(token)
        if key is None:
            raise exceptions.AuthenticationFailed("Invalid, expired or revoked API key.")
        if key.scope != KeyScope.ADMIN:
            raise exceptions.PermissionDenied("This API key may call the /v1 gateway only.")
        return key.user, key

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'


class AdminWithPermissions(permissions.DjangoModelPermissions):
    """An admin (staff) who also holds the Django permission for what is asked, as the admin site requires:
    `view_` to read, `add_`/`change_`/`delete_` to write. Superusers hold them all. Views without a model name
    theirs in `required_permissions`; actions that are not plain CRUD in `action_permissions`."""

    perms_map = {**permissions.DjangoModelPermissions.perms_map,
                 "GET": ["%(app_label)s.view_%(model_name)s"], "HEAD": ["%(app_label)s.view_%(model_name)s"]}

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated and user.is_staff):
            return False
        required = getattr(view, "action_permissions", {}).get(getattr(view, "action", None),
                                                               getattr(view, "required_permissions", None))
        if required is not None:
            return user.has_perms(required)
        return super().has_permission(request, view)

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'
