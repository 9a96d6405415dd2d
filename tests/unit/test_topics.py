"""Topic layout: building, parsing and refusing bad client ids and prefixes."""

from __future__ import annotations

import pytest

from fedmpq.errors import ConfigError
from fedmpq.topics import Topics


def test_topics_layout_and_parse() -> None:
    topics = Topics("lab/run1")
    assert topics.update("pi-4.b_2") == "lab/run1/update/pi-4.b_2"
    assert topics.coordinator_subscriptions == (
        "lab/run1/register/+",
        "lab/run1/status/+",
        "lab/run1/update/+",
    )
    for topic in (topics.register("d"), topics.status("d"), topics.task("d"), topics.update("d")):
        assert topics.parse(topic) == (topic.split("/")[2], "d")
    assert topics.model_at("0123abcd0123abcd") == "lab/run1/model_at/0123abcd0123abcd"
    assert topics.parse(topics.model_at("0123abcd0123abcd")) == ("model_at", "0123abcd0123abcd")
    assert topics.parse(topics.model_at("")) == ("model_at", "float32")
    assert "lab/run1/global" not in topics.device_subscriptions("d")
    assert topics.parse(topics.control) == ("control", None)
    for junk in ("lab/run1/update", "lab/run1/nope/d", "other/update/d", "lab/run1/update/a/b"):
        assert topics.parse(junk) is None
    for bad_id in ("", "a/b", "a+", "#", "x" * 65, "é"):
        with pytest.raises(ConfigError):
            topics.task(bad_id)
    with pytest.raises(ConfigError):
        topics.model_at("a/#")
    for bad_prefix in ("", "a//b", "a/+", "/a", "a/"):
        with pytest.raises(ConfigError):
            Topics(bad_prefix)
