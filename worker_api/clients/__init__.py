"""Clients of the services the worker API calls."""
