"""Data source names: checked once, and never shown with their password."""

from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit

from .exceptions import InvalidDSN


def parse_dsn(dsn: str, schemes: tuple[str, ...]) -> SplitResult:
    """Split ``dsn`` and check its scheme is one of ``schemes``."""
    if not isinstance(dsn, str):
        raise InvalidDSN(f'a DSN must be a string, not {type(dsn).__name__}')
    try:
        parts = urlsplit(dsn)
        if ',' not in parts.netloc:  # several hosts (a cluster's): cluster_nodes checks them
            parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise InvalidDSN(f'malformed DSN {mask_dsn(dsn)!r}: {exc}') from exc
    if parts.scheme not in schemes:
        raise InvalidDSN(
            f'unsupported scheme {parts.scheme!r} in DSN {mask_dsn(dsn)!r}; expected one of {schemes}'
        )
    return parts


# Query parameters that carry a secret (redis-py reads ``?password=``; others use the rest).
SECRET_PARAMS = frozenset({'password', 'pass', 'passwd', 'pwd', 'secret', 'token', 'access_token',
                           'api_key', 'apikey', 'ssl_password', 'ssl_keyfile_password'})


def mask_dsn(dsn: str) -> str:
    """``dsn`` with every secret (the password, and secret query parameters) shown as ``***``."""
    try:
        parts = urlsplit(dsn)
        password = parts.password
    except (ValueError, TypeError):
        return '<malformed DSN>'
    if password is not None:
        user = parts.username or ''
        host = parts.netloc.rpartition('@')[2]
        parts = parts._replace(netloc=f'{user}:***@{host}')
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(key.lower() in SECRET_PARAMS for key, _ in pairs):
            masked = [(k, '***' if k.lower() in SECRET_PARAMS else v) for k, v in pairs]
            parts = parts._replace(query=urlencode(masked, safe='*'))
    return parts.geturl()


def check_redis_db(parts: SplitResult, dsn: str) -> None:
    """A Redis DSN's path is empty or a database number: refuse ``redis://host/abc``.

    redis-py reads a path it cannot parse as database 0, silently.
    """
    if parts.scheme == 'unix':
        return
    path = parts.path.strip('/')
    if path and not (path.isdigit() and len(path) < 6):
        raise InvalidDSN(f'malformed DSN {mask_dsn(dsn)!r}: the path must be a database '
                         f'number, not {path!r}')


# Redis Cluster: ``redis+cluster://[user:password@]host:port[,host:port...][/0][?options]``.
REDIS_CLUSTER_SCHEMES = ('redis+cluster', 'rediss+cluster')


def cluster_nodes(parts: SplitResult, dsn: str) -> list[tuple[str, int]]:
    """The (host, port) startup nodes of a cluster DSN; port 6379 where none is given."""
    nodes = []
    for address in parts.netloc.rpartition('@')[2].split(','):
        host, _, port = address.rpartition(':') if ':' in address else (address, '', '6379')
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidDSN(f'malformed DSN {mask_dsn(dsn)!r}: {address!r} is not host:port')
        nodes.append((host.strip('[]'), int(port)))  # [::1] -> ::1
    if parts.path.strip('/') not in ('', '0'):
        raise InvalidDSN(f'malformed DSN {mask_dsn(dsn)!r}: a Redis Cluster has database 0 only')
    return nodes


def cluster_startup(parts: SplitResult, dsn: str) -> tuple[str, list[tuple[str, int]]]:
    """A cluster DSN as redis-py's ``RedisCluster.from_url`` takes it: the first node's plain
    URL (its options kept), and the other startup nodes."""
    (host, port), *others = cluster_nodes(parts, dsn)
    auth = parts.netloc.rpartition('@')[0]
    address = f'[{host}]:{port}' if ':' in host else f'{host}:{port}'  # [::1]:7000
    netloc = f'{auth}@{address}' if auth else address
    first = parts._replace(scheme=parts.scheme.removesuffix('+cluster'), netloc=netloc, path='')
    return first.geturl(), others
