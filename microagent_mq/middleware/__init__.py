"""Middlewares: the hooks metrics, tracing and users' own code use (see ``base``).

``MetricsMiddleware`` (extra ``[metrics]``) and ``TracingMiddleware`` (extra ``[otel]``) are
imported on first use, so this package works without either extra installed.
"""

from typing import TYPE_CHECKING, Any

from .base import Middleware, Outcome

if TYPE_CHECKING:
    from .metrics import MetricsMiddleware
    from .tracing import TracingMiddleware

__all__ = ['MetricsMiddleware', 'Middleware', 'Outcome', 'TracingMiddleware']


def __getattr__(name: str) -> Any:
    if name == 'MetricsMiddleware':
        from .metrics import MetricsMiddleware
        return MetricsMiddleware
    if name == 'TracingMiddleware':
        from .tracing import TracingMiddleware
        return TracingMiddleware
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
