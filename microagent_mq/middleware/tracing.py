"""``TracingMiddleware``: OpenTelemetry spans for sending and handling, one trace end to end.

A PRODUCER span per message sent (``send <destination>``) whose W3C ``traceparent`` (and
``tracestate`` when any) goes in the message headers; a CONSUMER span per handling
(``process <queue>``) that continues that trace — on every attempt, since retries keep the
headers. Attributes follow the OpenTelemetry messaging semantic conventions. The consumer
span is the current span while the handler runs: what the handler sends joins the trace.
"""

from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import context, propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("TracingMiddleware needs opentelemetry-api: pip install 'microagent-mq[otel]'"
                      ) from exc

from ..messages import MessageInfo
from .base import Middleware, Outcome

if TYPE_CHECKING:
    from ..transport import Outgoing

FAILED = frozenset({'retried', 'dead_lettered'})


class TracingMiddleware(Middleware):
    """Spans through ``tracer_provider`` (default: the global one); ``system``: ``messaging.system``."""

    def __init__(self, tracer_provider: 'trace.TracerProvider | None' = None,
                 system: str = 'microagent_mq') -> None:
        from .. import __version__

        self.tracer = trace.get_tracer('microagent_mq', __version__, tracer_provider=tracer_provider)
        self.system = system
        # Open consumer spans by the id of their MessageInfo (alive until after_handle).
        self._open: dict[int, tuple[trace.Span, object]] = {}

    async def before_send(self, outgoing: 'Outgoing') -> None:
        destination = outgoing.exchange or (outgoing.queues[0] if outgoing.queues else '')
        attributes: dict[str, Any] = {
            'messaging.system': self.system,
            'messaging.operation.type': 'send',
            'messaging.operation.name': 'send',
            'messaging.destination.name': destination,
            'messaging.message.id': outgoing.message_id,
            'messaging.message.body.size': len(outgoing.body),
        }
        if outgoing.topic:
            attributes['messaging.rabbitmq.destination.routing_key'] = outgoing.topic
        with self.tracer.start_as_current_span(f'send {destination}', kind=SpanKind.PRODUCER,
                                               attributes=attributes):
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
        # A new dict: the one there may be shared by every message of a batch or class.
        outgoing.headers = {**(outgoing.headers or {}), **carrier}

    async def before_handle(self, info: MessageInfo) -> None:
        parent = propagate.extract(info.headers)
        span = self.tracer.start_span(f'process {info.queue}', context=parent, kind=SpanKind.CONSUMER,
                                      attributes={
                                          'messaging.system': self.system,
                                          'messaging.operation.type': 'process',
                                          'messaging.operation.name': 'process',
                                          'messaging.destination.name': info.queue,
                                          'messaging.message.id': info.message_id,
                                          'microagent_mq.attempt': info.attempt,
                                      })
        token = context.attach(trace.set_span_in_context(span))
        self._open[id(info)] = (span, token)

    async def after_handle(self, info: MessageInfo, outcome: Outcome, seconds: float) -> None:
        opened = self._open.pop(id(info), None)
        if opened is None:
            return
        span, token = opened
        span.set_attribute('microagent_mq.outcome', outcome)
        if outcome in FAILED:
            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end()
        context.detach(token)  # type: ignore[arg-type]
