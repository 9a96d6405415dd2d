"""fedmpq: federated learning with mixed-precision quantization for edge fleets.

The core package is shared by the edge agent (``edge_client``) and the coordinator
(``coordinator``): quantizers, bit-packing, the wire codec, models, data and
bit-allocation policies.  It does no network I/O of its own except in ``fedmpq.mqtt``.
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = 4
