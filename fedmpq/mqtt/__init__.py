"""Many MQTT connections in one process, served by one selector thread.

paho's threaded ``loop_start()`` gives every client a thread and waits on ``select()``,
which cannot watch file descriptors >= 1024: one process with a few hundred such
clients stops connecting, silently.  Here every client runs on paho's external-loop
API, driven by one :class:`MqttLoop` (a ``selectors.DefaultSelector``, epoll on Linux,
in one thread), whether the process hosts one device, the coordinator or a thousand
emulated devices.

Threading model
---------------
* Every call into a paho client happens on the loop thread.  :meth:`Connection.publish`,
  :meth:`Connection.subscribe` and :meth:`Connection.close` may be called from any
  thread: they hand the work to the loop with :meth:`MqttLoop.call_soon`.
* paho's connect is a blocking TCP connect (and TLS handshake), so connection attempts
  run on a small worker pool; the loop keeps serving the other clients meanwhile.
* ``on_message`` and ``on_connect`` callbacks run on the loop thread.  They must return
  quickly -- hand decoding, training or aggregation to another thread -- or every
  connection of the process stalls.  An exception they raise is logged and dropped.

Sessions
--------
MQTT 5 (the default) connects with clean start on a connection's first connect and
resumes the session on reconnects, with a session expiry interval, so QoS 1 messages
sent to a client during a short disconnect are delivered when it comes back.  MQTT 3.1.1
(for brokers such as amqtt that speak nothing else) always starts a clean session:
messages sent to a client while it is away are lost.

Modules
-------
``address``: :class:`BrokerAddress`; ``packets``: PUBLISH sizes and limits; ``loop``: the
:class:`MqttLoop` thread; ``connection``: :class:`Connection`, with its paho client
(``client``), reconnect backoff (``backoff``) and unsent/unacknowledged messages
(``outbox``).  Everything public is importable from ``fedmpq.mqtt``.
"""

from fedmpq.mqtt.address import BrokerAddress
from fedmpq.mqtt.client import Will
from fedmpq.mqtt.connection import ConnectHandler, Connection, MessageHandler
from fedmpq.mqtt.loop import MqttLoop
from fedmpq.mqtt.packets import Protocol, publish_packet_size

__all__ = [
    "BrokerAddress",
    "ConnectHandler",
    "Connection",
    "MessageHandler",
    "MqttLoop",
    "Protocol",
    "Will",
    "publish_packet_size",
]
