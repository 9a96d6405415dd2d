"""TLS files named in an mqtts:// broker URL (``?ca=...&cert=...&key=...``)."""

from __future__ import annotations

import pytest

from fedmpq.errors import ConfigError
from fedmpq.mqtt import BrokerAddress


def test_tls_files_come_from_the_query() -> None:
    address = BrokerAddress.parse("mqtts://u:p@h?ca=/etc/a%20b/ca.crt&cert=/c.crt&key=/c.key")
    assert address == BrokerAddress(
        "h", 8883, True, "u", "p", ca_file="/etc/a b/ca.crt", cert_file="/c.crt", key_file="/c.key"
    )
    assert address.url == "mqtts://h:8883"  # no credentials, no files in logs


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("mqtt://h?ca=/ca.crt", "plain mqtt://"),
        ("mqtts://h?cafile=/ca.crt", "may name ca, cert, key"),
        ("mqtts://h?ca=", "may name ca, cert, key"),
        ("mqtts://h?ca=/a&ca=/b", "may name ca, cert, key"),
        ("mqtts://h?key=/k", "without a client certificate"),
        ("mqtts://h/path?ca=/a", "unexpected path"),
    ],
)
def test_bad_tls_queries_are_refused(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        BrokerAddress.parse(url)
