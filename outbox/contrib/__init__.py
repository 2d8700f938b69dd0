"""Integrations of the outbox with frameworks; each is imported only when used."""
