"""Data source names: checked once, and never shown with their password."""

from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit

from .exceptions import InvalidDSN


def parse_dsn(dsn: str, schemes: tuple[str, ...]) -> SplitResult:
    """Split ``dsn`` and check its scheme is one of ``schemes``."""
    if not isinstance(dsn, str):
        raise InvalidDSN(f'a DSN must be a string, not {type(dsn).__name__}')
    try:
        parts = urlsplit(dsn)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise InvalidDSN(f'malformed DSN {mask_dsn(dsn)!r}: {exc}') from exc
    if parts.scheme not in schemes:
        raise InvalidDSN(
            f'unsupported scheme {parts.scheme!r} in DSN {mask_dsn(dsn)!r}; expected one of {schemes}'
        )
    return parts


SECRET_PARAMS = frozenset({'password', 'passwd', 'pass', 'secret', 'token'})


def mask_dsn(dsn: str) -> str:
    """``dsn`` with its password replaced by ``***``, in the netloc and in the query."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return '<malformed DSN>'
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(key.lower() in SECRET_PARAMS for key, _ in pairs):
            parts = parts._replace(query=urlencode(
                [(key, '***' if key.lower() in SECRET_PARAMS else value) for key, value in pairs],
                safe='*'))
    if parts.password is None:
        return parts.geturl()
    user = parts.username or ''
    host = parts.netloc.rpartition('@')[2]
    return parts._replace(netloc=f'{user}:***@{host}').geturl()
