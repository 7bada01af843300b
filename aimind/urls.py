from django.contrib import admin
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from aimind.metrics import metrics_view
from gateway_app.api import ApiKeyViewSet
from models_app.api import ModelInstanceViewSet, ModelViewSet
from models_app.sources_api import SourceFilesView, SourceModelsView
from scheduler_app.api import EvaluationView
from workers_app.agent_api import AssignmentsView, ReportView
from workers_app.api import GpuListView, WorkerViewSet

router = SimpleRouter()
router.trailing_slash = "/?"  # SPEC routes have no trailing slash; accept both
router.register("models", ModelViewSet, basename="model")
router.register("instances", ModelInstanceViewSet, basename="instance")
router.register("workers", WorkerViewSet, basename="worker")
router.register("keys", ApiKeyViewSet, basename="key")

urlpatterns = [
    # Only admins may sign in (the admin's own form): a signed-in non-admin could open no page at all.
    path("login/", auth_views.LoginView.as_view(redirect_authenticated_user=True,
                                                authentication_form=AdminAuthenticationForm), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("i18n/", include("django.conf.urls.i18n")),
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="metrics"),
    path("api/v1/gpus", GpuListView.as_view(), name="gpu-list"),
    path("api/v1/evaluations", EvaluationView.as_view(), name="evaluations"),
    path("api/v1/sources/<str:hub>/models", SourceModelsView.as_view(), name="source-models"),
    path("api/v1/sources/<str:hub>/files", SourceFilesView.as_view(), name="source-files"),
    # A worker's own routes (its node agent): the cluster token and the worker's credential.
    path("api/v1/workers/<int:pk>/assignments", AssignmentsView.as_view(), name="worker-assignments"),
    path("api/v1/workers/<int:pk>/reports", ReportView.as_view(), name="worker-reports"),
    path("api/v1/", include(router.urls)),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("v1/", include("gateway_app.urls")),
    path("", include("models_app.urls")),
]
