"""Redis Cluster for ``RedisBroker``: the client, the keys' hash tags, and clear errors.

Every key of one queue carries the queue's name as its hash tag (``mq:{q}``,
``mq:{q}:delayed``, ``mq:{q}.dlq``, ``mq:{q}:sent:...``): they live in one slot, so each
Lua script and each MULTI of a queue runs on one node, as on a single Redis.
"""

from typing import Any
from urllib.parse import SplitResult

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ClusterCrossSlotError, ClusterDownError, MovedError, RedisClusterException

from ..dsn import REDIS_CLUSTER_SCHEMES, cluster_startup, mask_dsn
from ..exceptions import BrokerUnavailable, ConfigurationError, QueueException

__all__ = ['CLUSTER_ERRORS', 'REDIS_CLUSTER_SCHEMES', 'cluster_client', 'cluster_error', 'tagged']

# What a cluster (or a cluster node reached as a plain Redis) raises beyond connection errors.
CLUSTER_ERRORS = (RedisClusterException, ClusterDownError, MovedError, ClusterCrossSlotError)
NOT_CLUSTER = 'Cluster mode is not enabled'  # redis-py, when CLUSTER SLOTS is refused
UNREACHABLE = 'cannot be connected'  # redis-py, when no startup node answered


def tagged(prefix: str, queue: str) -> str:
    """The stream key of ``queue`` in a cluster: the name is the hash tag of every key of it."""
    return f'{prefix}{{{queue}}}'


def check_prefix(prefix: str) -> None:
    """A brace in the prefix would become the hash tag: every queue in one slot, or worse."""
    if '{' in prefix or '}' in prefix:
        raise ConfigurationError(f'prefix {prefix!r}: no braces in Redis Cluster mode '
                                 f'(the queue name is the hash tag)')


def cluster_client(dsn: str, parts: SplitResult, **options: Any) -> RedisCluster:
    """A ``RedisCluster`` for a ``redis+cluster://`` DSN (or a plain one, with cluster=True)."""
    first, others = cluster_startup(parts, dsn)
    return RedisCluster.from_url(first, startup_nodes=[ClusterNode(h, p) for h, p in others],
                                 **options)


def cluster_error(exc: Exception, dsn: str, cluster: bool) -> QueueException | None:
    """The one-line error for a cluster problem; None: a bug of ours (CROSSSLOT), raise it."""
    if cluster and NOT_CLUSTER in str(exc):
        return ConfigurationError(f'{mask_dsn(dsn)} is not a Redis Cluster node '
                                  f'(cluster_enabled:0); use redis://')
    if cluster and (UNREACHABLE in str(exc) or isinstance(exc, ClusterDownError)):
        return BrokerUnavailable(f'Redis Cluster at {mask_dsn(dsn)} is unreachable: {exc}')
    if not cluster and isinstance(exc, MovedError | ClusterCrossSlotError):  # keys of one queue
        return ConfigurationError(f'{mask_dsn(dsn)} is a Redis Cluster node ({exc}); '
                                  f'use redis+cluster://')
    return None
