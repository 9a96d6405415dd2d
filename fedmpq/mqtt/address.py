"""Where a broker listens and how to authenticate to it: :class:`BrokerAddress`."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from fedmpq.errors import ConfigError

_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
# Query keys of an mqtts:// URL: its CA file, client certificate and key.
_TLS_QUERY = ("ca", "cert", "key")


@dataclass(frozen=True)
class BrokerAddress:
    """Where a broker listens and how to authenticate to it.

    ``password`` is left out of ``repr`` and of :attr:`url` so addresses can be logged.
    """

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("broker address has no host")
        if not 0 < self.port < 65536:
            raise ConfigError(f"broker port {self.port} is out of range: use 1..65535")
        if self.password is not None and self.username is None:
            raise ConfigError("broker password given without a username")
        if self.key_file is not None and self.cert_file is None:
            raise ConfigError("broker TLS key file given without a client certificate file")
        if not self.tls and (self.ca_file or self.cert_file):
            raise ConfigError("TLS files given for a plain mqtt:// broker: use mqtts://")

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Parse ``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...[?ca=FILE]``.

        Parameters
        ----------
        url
            Broker URL; the port defaults to 1883 (mqtt) or 8883 (mqtts), user name and
            password may be percent-encoded, IPv6 hosts go in brackets.  An ``mqtts://``
            URL may name its TLS files in the query: ``ca`` (the CA that signed the
            broker's certificate; default: the system's CAs), ``cert`` and ``key`` (a
            client certificate, for a broker that requires one), so one string (e.g.
            ``$FEDMPQ_BROKER``) says everything about the connection.

        Returns
        -------
        BrokerAddress

        Raises
        ------
        ConfigError
            If the URL has another scheme, no host, a bad port, a path or fragment, or a
            query other than the TLS files of an ``mqtts://`` URL.
        """
        hint = "expected mqtt://[user[:password]@]host[:port] or mqtts://...[?ca=FILE]"
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except (ValueError, AttributeError) as exc:
            raise ConfigError(f"invalid broker URL {url!r}: {exc}; {hint}") from exc
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ConfigError(f"invalid broker URL {url!r}: unknown scheme {scheme!r}; {hint}")
        if not parts.hostname:
            raise ConfigError(f"invalid broker URL {url!r}: no host; {hint}")
        if parts.path not in ("", "/") or parts.fragment:
            raise ConfigError(f"invalid broker URL {url!r}: unexpected path; {hint}")
        files = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
        unknown = sorted(set(files) - set(_TLS_QUERY))
        if unknown or any(len(v) != 1 or not v[0] for v in files.values()):
            raise ConfigError(
                f"invalid broker URL {url!r}: the query may name {', '.join(_TLS_QUERY)} "
                f"once each, with a file; {hint}"
            )
        if parts.query and not files:
            raise ConfigError(f"invalid broker URL {url!r}: unexpected query; {hint}")
        return cls(
            host=parts.hostname,
            port=_DEFAULT_PORTS[scheme] if port is None else port,
            tls=scheme == "mqtts",
            username=None if parts.username is None else unquote(parts.username),
            password=None if parts.password is None else unquote(parts.password),
            ca_file=files.get("ca", [None])[0],
            cert_file=files.get("cert", [None])[0],
            key_file=files.get("key", [None])[0],
        )

    @property
    def url(self) -> str:
        """The address as a URL, without credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"
