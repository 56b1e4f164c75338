"""Failgate: a reverse proxy whose behaviour when its state store fails is declared per route."""

__version__ = "0.1.0"
