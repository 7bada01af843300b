from django.urls import path, re_path

from gateway_app.dashboard import DashboardView
from models_app import views
from workers_app.views import ResourcesView, WorkerLabelsView

urlpatterns = [
    path("", views.ModelListView.as_view(), name="models"),
    path("models/deploy/", views.ModelFormView.as_view(), name="model-deploy"),
    path("models/evaluate/", views.ModelEvaluateView.as_view(), name="model-evaluate"),
    path("models/<int:pk>/edit/", views.ModelFormView.as_view(), name="model-edit"),
    re_path(r"^models/(?P<pk>\d+)/(?P<action>stop|start|delete)/$", views.ModelActionView.as_view(),
            name="model-action"),
    path("instances/<int:pk>/delete/", views.InstanceDeleteView.as_view(), name="instance-delete"),
    path("instances/<int:pk>/", views.InstanceDetailView.as_view(), name="instance"),
    path("instances/<int:pk>/logs/", views.InstanceLogsView.as_view(), name="instance-logs"),
    path("instances/<int:pk>/logs/download", views.InstanceLogDownloadView.as_view(), name="instance-log-download"),
    path("resources/", ResourcesView.as_view(), name="resources"),
    path("dashboard/", DashboardView.as_view(), name="dashboard"),
    path("resources/workers/<int:pk>/edit/", WorkerLabelsView.as_view(), name="worker-edit"),
]
