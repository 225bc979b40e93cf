"""Clients of the Hogwild! HTTP server: a Python API (``HogwildClient``) and the ``hogwild`` command."""

from clients.client import Event, HogwildClient, HogwildError

__all__ = ["Event", "HogwildClient", "HogwildError"]
