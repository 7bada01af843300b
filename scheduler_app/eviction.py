"""Making room (AIMIND_EVICT_IDLE_MODELS): when instances wait because no worker has room, idle models that opted
into sleeping (`sleep_after_minutes`, no request for AIMIND_EVICT_IDLE_AFTER seconds) are put to sleep, least
recently used first, and only as many as the scheduler's own evaluation says a waiting instance needs to fit: the
pool read without their claims. The pass that follows their stop places the instance."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from models_app.actions import active_at, do_sleep_model, sleepers
from models_app.lifecycle import do_note_room_made
from models_app.models import Model, ModelInstance
from scheduler_app.estimate import ModelEstimate
from scheduler_app.pool import read_pool
from scheduler_app.session import PlacementSession

logger = logging.getLogger(__name__)
MOST_VICTIMS = 32  # idle models weighed for one waiting instance, least recently used first
MOST_TRIED = 4  # waiting models tried per pass (each costs a pool read per victim weighed)


def _idle_victims(cutoff) -> list[tuple[Model, list[int]]]:
    """Idle models that hold resources, least recently used first, each with its placed instances' ids."""
    idle = sorted((m for m in sleepers() if not m.starting and active_at(m) < cutoff), key=active_at)[:MOST_VICTIMS]
    placed: dict[int, list[int]] = {}
    for pk, model_id in ModelInstance.objects.filter(model__in=[m.pk for m in idle], worker__isnull=False) \
            .values_list("pk", "model_id"):
        placed.setdefault(model_id, []).append(pk)
    return [(m, placed[m.pk]) for m in idle if m.pk in placed]


def _fits(model: Model, est: ModelEstimate, freed: list[int]) -> bool:
    return PlacementSession(read_pool(freed)).best(model, est).candidate is not None


def _victims_for(model: Model, est: ModelEstimate, idle: list[tuple[Model, list[int]]]) -> list[Model]:
    """The fewest of `idle` (least recently used first) whose room lets `model` fit; [] when even all would not."""
    others = [(m, ids) for m, ids in idle if m.pk != model.pk]
    chosen: list[tuple[Model, list[int]]] = []
    for victim in others:
        chosen.append(victim)
        if _fits(model, est, [pk for _, ids in chosen for pk in ids]):
            break
    else:
        return []
    for victim in reversed(chosen[:-1]):  # one taken early may not be needed once later ones were: keep it awake
        rest = [v for v in chosen if v is not victim]
        if _fits(model, est, [pk for _, ids in rest for pk in ids]):
            chosen = rest
    return [m for m, _ in chosen]


def make_room(waiting: list[tuple[ModelInstance, ModelEstimate]]) -> list[str]:
    """For the first waiting instance that idle models' room would let fit, put those models to sleep. Returns the
    names put to sleep."""
    if not settings.EVICT_IDLE_MODELS or not waiting:
        return []
    cutoff = timezone.now() - timedelta(seconds=settings.EVICT_IDLE_AFTER)
    idle = _idle_victims(cutoff)
    tried: set[int] = set()
    for instance, est in waiting:
        if not idle:
            return []
        if instance.model_id in tried:
            continue
        if len(tried) >= MOST_TRIED:
            break
        tried.add(instance.model_id)
        victims = _victims_for(instance.model, est, idle)
        slept = [v.name for v in victims if do_sleep_model(
            v, f"to make room for {instance.name} (model {instance.model.name})", idle_before=cutoff)]
        if slept:
            names = ", ".join(slept)
            do_note_room_made(instance, f"no worker had room; put idle model(s) {names} to sleep (least recently "
                                        f"used) to make room; placing it again")
            return slept
    return []
