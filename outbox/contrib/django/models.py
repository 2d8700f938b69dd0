"""No models: the outbox tables are made by the outbox's own migrations.

The module exists so that Django sends this app ``post_migrate``, which creates the
tables in a database whose migrations are turned off (see
:func:`outbox.contrib.django.schema.create_when_unmigrated`).
"""
