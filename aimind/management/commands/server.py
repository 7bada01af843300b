"""The control plane only (web, scheduler, beat) for a cluster whose workers run `manage.py worker`."""

from aimind.management.commands.up import Command as UpCommand


class Command(UpCommand):
    help = "Run the control plane (web, scheduler, beat) in the foreground; workers join it."
    with_worker = False
