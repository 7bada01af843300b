from django.db import migrations


def reported_as_they_are(apps, schema_editor):
    """Workers registered before labels were told apart: what they have is what they reported."""
    Worker = apps.get_model("workers_app", "Worker")
    for worker in Worker.objects.filter(reported_labels={}).exclude(labels={}):
        worker.reported_labels = worker.labels
        worker.save(update_fields=["reported_labels"])


class Migration(migrations.Migration):
    dependencies = [("workers_app", "0002_pages_and_labels")]
    operations = [migrations.RunPython(reported_as_they_are, migrations.RunPython.noop)]
