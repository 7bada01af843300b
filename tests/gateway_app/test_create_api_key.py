"""`create_api_key NAME` prints the key once, alone on the last line; only its hash is stored."""

from io import StringIO

import pytest
from django.core.management import call_command

from gateway_app.models import ApiKey, hash_key

pytestmark = pytest.mark.django_db


def test_key_is_printed_last_and_only_its_hash_kept(admin_user):
    out = StringIO()
    call_command("create_api_key", "ci", stdout=out)
    raw = out.getvalue().strip().splitlines()[-1]
    assert raw.startswith("aimind-") and " " not in raw
    stored = ApiKey.objects.get(name="ci")
    assert stored.key_hash == hash_key(raw)
    assert raw not in (stored.key_hash, stored.key_prefix)
    assert ApiKey.user_for(raw) == admin_user


def test_without_admin_it_says_what_to_do(db):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="bootstrap_admin"):
        call_command("create_api_key", "ci")
