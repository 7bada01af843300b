from django.urls import path

from models_app.consumers import InstanceLogConsumer

websocket_urlpatterns = [
    path("ws/instances/<int:instance_id>/logs", InstanceLogConsumer.as_asgi()),
]
