"""Settings of the test suite's Django project.

``DATABASE_URL`` is the ``default`` database (the tests give each test a database of
its own); ``OTHER_DATABASE_URL``, when set, a second one named ``other``.
``SHOP_TEST_MIGRATE=false`` builds the test databases without migrations
(``TEST["MIGRATE"] = False``); ``SHOP_DB_POOL=true`` turns on Django's psycopg
connection pool (``OPTIONS["pool"]``); ``SHOP_OUTBOX_MIGRATIONS=off`` turns the
outbox app's migrations off (``MIGRATION_MODULES``).
"""

from __future__ import annotations

import os
from typing import Any

from psycopg.conninfo import conninfo_to_dict

SECRET_KEY = "django-project-of-the-outbox-tests"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "localhost"]
USE_TZ = True
ROOT_URLCONF = "project.urls"
INSTALLED_APPS = ["outbox.contrib.django", "shop"]
MIDDLEWARE: list[str] = []
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def database(url: str) -> dict[str, Any]:
    """A ``DATABASES`` entry from a PostgreSQL URL."""
    info = conninfo_to_dict(url.replace("postgresql+psycopg://", "postgresql://", 1))
    entry: dict[str, Any] = {"ENGINE": "django.db.backends.postgresql"}
    for key, setting in (
        ("dbname", "NAME"),
        ("user", "USER"),
        ("password", "PASSWORD"),
        ("host", "HOST"),
        ("port", "PORT"),
    ):
        entry[setting] = info.pop(key, "") or ""
    entry["OPTIONS"] = info
    return entry


DATABASES = {"default": database(os.environ["DATABASE_URL"])}
if os.environ.get("OTHER_DATABASE_URL"):
    DATABASES["other"] = database(os.environ["OTHER_DATABASE_URL"])
if os.environ.get("SHOP_TEST_MIGRATE") == "false":
    DATABASES["default"]["TEST"] = {"MIGRATE": False}
if os.environ.get("SHOP_DB_POOL") == "true":
    DATABASES["default"]["OPTIONS"]["pool"] = True
if os.environ.get("SHOP_OUTBOX_MIGRATIONS") == "off":
    MIGRATION_MODULES = {"posthog_outbox": None}
