"""BrokerAddress: parsing broker URLs, and keeping the password out of logs."""

from __future__ import annotations

import pytest

from fedmpq.errors import ConfigError
from fedmpq.mqtt import BrokerAddress


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.local", BrokerAddress("broker.local", 1883)),
        ("mqtts://h:9000", BrokerAddress("h", 9000, tls=True)),
        ("mqtt://u:p%40ss@10.0.0.5:1884", BrokerAddress("10.0.0.5", 1884, False, "u", "p@ss")),
        ("mqtt://[::1]:1883/", BrokerAddress("::1", 1883)),
    ],
)
def test_broker_address_parse(url: str, expected: BrokerAddress) -> None:
    assert BrokerAddress.parse(url) == expected


@pytest.mark.parametrize(
    "url",
    ["", "broker:1883", "http://h", "mqtt://", "mqtt://h:99999", "mqtt://h:x", "mqtt://h/path"],
)
def test_broker_address_parse_rejects_junk(url: str) -> None:
    with pytest.raises(ConfigError):
        BrokerAddress.parse(url)


def test_broker_address_hides_password() -> None:
    address = BrokerAddress.parse("mqtt://user:secret@h:1")
    assert "secret" not in repr(address) and "secret" not in address.url
    assert address.url == "mqtt://h:1"
