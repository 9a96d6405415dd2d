"""The wire format: message dataclasses and their strict msgpack codec."""
