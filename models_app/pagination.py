"""Every API list is bounded: `?limit=` (default 500, at most 1000) and `?offset=`; the body stays a plain list, the
total and the next page travel in headers (`X-Total-Count`, `Link: <…>; rel="next"`)."""

from __future__ import annotations

from rest_framework.pagination import LimitOffsetPagination
from rest_framework.response import Response


class HeaderPagination(LimitOffsetPagination):
    default_limit = 500
    max_limit = 1000

    def get_paginated_response(self, data):
        response = Response(data)
        response["X-Total-Count"] = str(self.count)
        links = [f'<{url}>; rel="{rel}"' for url, rel in ((self.get_next_link(), "next"),
                                                         (self.get_previous_link(), "prev")) if url]
        if links:
            response["Link"] = ", ".join(links)
        return response

    def get_paginated_response_schema(self, schema):
        return schema
