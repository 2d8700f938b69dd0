"""The Django app of posthog-outbox: add ``"outbox.contrib.django"`` to
``INSTALLED_APPS`` and ``manage.py migrate`` creates the outbox tables (and Django's
test databases get them), by running the outbox's own Alembic migrations.

Enqueueing needs no app: ``outbox.enqueue(django.db.connection, ...)`` works in any
Django project on PostgreSQL with psycopg 3. See docs/django.md.
"""
