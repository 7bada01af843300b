from django.urls import path

from models_app.consumers import InstanceLogConsumer
from models_app.live import ModelsLiveConsumer

websocket_urlpatterns = [
    path("ws/instances/<int:instance_id>/logs", InstanceLogConsumer.as_asgi()),
    path("ws/models", ModelsLiveConsumer.as_asgi()),
]
