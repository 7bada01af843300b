"""Template helpers shared by the pages: state badges coloured by the choices, sizes in the page's language."""

from __future__ import annotations

from django import template
from django.template.defaultfilters import filesizeformat
from django.utils.formats import number_format
from django.utils.html import format_html

from models_app.choices import EVENT_STATE_CHOICES, CategoryChoices, InstanceState
from workers_app.choices import WorkerState

register = template.Library()


@register.simple_tag
def state_badge(state: str, progress: float | None = None, count: int | None = None):
    """A coloured badge with the state's label (in the page's language), a download's percent, a count."""
    label = InstanceState(state).label if state in InstanceState.values else dict(EVENT_STATE_CHOICES).get(state, state)
    extra = ""
    if state == InstanceState.DOWNLOADING and progress is not None:
        extra = f" {number_format(progress, 0)}%"
    if count is not None:
        extra += f" ×{count}"
    return format_html('<span class="badge" data-state="{}" style="background:{}">{}{}</span>', state,
                       InstanceState.colour(state), label, extra)


@register.simple_tag
def worker_badge(worker):
    return format_html('<span class="badge" data-state="{}" style="background:{}">{}</span>', worker.state,
                       WorkerState.colour(worker.state), worker.get_state_display())


@register.filter
def size(n) -> str:
    return filesizeformat(n or 0)


@register.filter
def get_item(mapping, key):
    return (mapping or {}).get(key) or []


@register.filter
def category_label(value: str) -> str:
    return CategoryChoices(value).label if value in CategoryChoices.values else value
