"""GET /api/v1/sources/<hub>/models and /files: what a hub offers, before deploying it. Admin only (the API default).

Every answer names the hub and how long it took; hub failures come back as 404 / 403 / 502 with the hub's message."""

from __future__ import annotations

import time
from collections.abc import Callable

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from models_app.sources import HUBS, SourceError, get_source, group_files

HUB_PARAMETER = OpenApiParameter("hub", str, OpenApiParameter.PATH, enum=list(HUBS))


class ModelsQuery(serializers.Serializer):
    search = serializers.CharField(required=False, default="", allow_blank=True, max_length=200)
    gguf = serializers.BooleanField(required=False, default=False)
    limit = serializers.IntegerField(required=False, default=50, min_value=1, max_value=500)


class FilesQuery(serializers.Serializer):
    repo = serializers.RegexField(r"^(?!.*\.\.)\w[\w.-]*(/\w[\w.-]*)?$", max_length=200,
                                  error_messages={"invalid": "expected owner/name"})
    revision = serializers.CharField(required=False, default="main", max_length=200)


def _unknown(hub: str) -> Response | None:
    if hub in HUBS:
        return None
    return Response({"detail": f"unknown hub {hub!r} (one of {', '.join(HUBS)})", "hub": hub}, status=404)


def _answer(hub: str, call: Callable[[], dict]) -> Response:
    """Run `call` against the hub; its result, or the hub's refusal, with the hub's name and the time taken."""
    started = time.perf_counter()
    try:
        body = call()
    except SourceError as exc:
        elapsed = round((time.perf_counter() - started) * 1000, 1)
        return Response({"detail": exc.message, "hub": hub, "elapsed_ms": elapsed}, status=exc.status)
    return Response({"hub": hub, "elapsed_ms": round((time.perf_counter() - started) * 1000, 1), **body})


class SourceModelsView(APIView):
    """Repos whose name matches `search`, with downloads, likes and tags; `gguf=true` keeps GGUF repos only."""

    required_permissions = ["models_app.add_model"]

    @extend_schema(parameters=[HUB_PARAMETER, ModelsQuery], responses={200: dict, 403: dict, 404: dict, 502: dict})
    def get(self, request: Request, hub: str) -> Response:
        if unknown := _unknown(hub):
            return unknown
        query = ModelsQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        args = query.validated_data
        return _answer(hub, lambda: {"query": args["search"], "gguf": args["gguf"], "results": get_source(hub).search(
            args["search"], gguf=args["gguf"], limit=args["limit"])})


class SourceFilesView(APIView):
    """Every file of a repo with its size, and the GGUF files grouped by quantization (split sets joined)."""

    required_permissions = ["models_app.add_model"]

    @extend_schema(parameters=[HUB_PARAMETER, FilesQuery], responses={200: dict, 403: dict, 404: dict, 502: dict})
    def get(self, request: Request, hub: str) -> Response:
        if unknown := _unknown(hub):
            return unknown
        query = FilesQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        repo, revision = query.validated_data["repo"], query.validated_data["revision"]

        def listing() -> dict:
            files = get_source(hub).list_files(repo, revision)
            return {"repo": repo, "revision": revision, "total_size": sum(f.size for f in files),
                    "files": [{"path": f.path, "size": f.size} for f in files], "groups": group_files(files)}

        return _answer(hub, listing)
