from django.urls import path, re_path

from gateway_app import views

urlpatterns = [
    path("models", views.list_models),
    re_path(r"^(?P<route>chat/completions|completions|embeddings|rerank|audio/speech|audio/transcriptions)$",
            views.proxy),
]
