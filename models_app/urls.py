from django.urls import path, re_path

from gateway_app.dashboard import DashboardView
from gateway_app.key_pages import KeyFormView, KeyListView, KeyRevokeView
from models_app import views
from workers_app.views import ResourcesView, WorkerLabelsView

urlpatterns = [
    path("", views.ModelListView.as_view(), name="models"),
    path("models/deploy/", views.ModelFormView.as_view(), name="model-deploy"),
    path("models/evaluate/", views.ModelEvaluateView.as_view(), name="model-evaluate"),
    path("models/export/", views.ModelExportView.as_view(), name="models-export"),
    path("models/import/", views.ModelImportView.as_view(), name="models-import"),
    path("models/<int:pk>/edit/", views.ModelFormView.as_view(), name="model-edit"),
    re_path(r"^models/(?P<pk>\d+)/(?P<action>stop|start|delete)/$", views.ModelActionView.as_view(),
            name="model-action"),
    path("instances/<int:pk>/delete/", views.InstanceDeleteView.as_view(), name="instance-delete"),
    path("instances/<int:pk>/", views.InstanceDetailView.as_view(), name="instance"),
    path("instances/deleted/", views.DeletedInstancesView.as_view(), name="instances-deleted"),
    path("instances/<int:pk>/logs/", views.InstanceLogsView.as_view(), name="instance-logs"),
    path("instances/<int:pk>/logs/download", views.InstanceLogDownloadView.as_view(), name="instance-log-download"),
    path("resources/", ResourcesView.as_view(), name="resources"),
    path("dashboard/", DashboardView.as_view(), name="dashboard"),
    path("keys/", KeyListView.as_view(), name="keys"),
    path("keys/new/", KeyFormView.as_view(), name="key-new"),
    path("keys/<int:pk>/edit/", KeyFormView.as_view(), name="key-edit"),
    path("keys/<int:pk>/revoke/", KeyRevokeView.as_view(), name="key-revoke"),
    path("resources/workers/<int:pk>/edit/", WorkerLabelsView.as_view(), name="worker-edit"),
]
