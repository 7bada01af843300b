from django.urls import path, re_path

from gateway_app import views

# Served by gateway_app.proxy under uvicorn (see aimind.asgi); these reach it through Django's handler.
urlpatterns = [
    path("models", views.gateway),
    re_path(r"^(?P<route>chat/completions|completions|embeddings|rerank|audio/speech|audio/transcriptions|messages)$",
            views.gateway),
]
