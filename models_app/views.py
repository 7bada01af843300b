from django.contrib.admin.views.decorators import staff_member_required
from django.db.models import Count, Q
from django.shortcuts import render

from models_app.choices import InstanceState
from models_app.models import Model, ModelInstance
from workers_app.models import Worker


@staff_member_required
def dashboard(request):
    models = Model.objects.annotate(
        ready_replicas_count=Count("instances", filter=Q(instances__state=InstanceState.RUNNING)))
    instances = ModelInstance.objects.select_related("model", "worker").order_by("model__name", "id")
    return render(request, "models/dashboard.html", {
        "models": models, "instances": instances, "workers": Worker.objects.all(),
    })
