"""Middlewares: the hooks metrics, tracing and users' own code use (see ``base``)."""

from .base import Middleware, Outcome

__all__ = ['Middleware', 'Outcome']
