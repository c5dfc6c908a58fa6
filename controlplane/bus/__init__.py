"""The inter-kernel bus on Redis Streams (see docs/bus.md).

- `core`: `InterKernelBus`, the spec's API (register, subscribe, publish, send_direct, get_stats)
  plus request/reply and batched publishing
- `consumer`: one kernel's delivery loop (pending drain, XAUTOCLAIM retries, dead letters)
- `publisher`: batched appends (`bus_publish.lua`) and trimming (`bus_trim.lua`)
- `codec`: messages as flat stream fields, `BusConfig`
- `recovery`: delivery counts, dead letters, gaps (the consumer's slow paths)
- `stats`: `get_stats()` from Redis
- `cli`: `kcp bus publish|tail|stats`
"""

from controlplane.bus.codec import BusConfig, Published, ReceivedMessage
from controlplane.bus.consumer import MessageHandler
from controlplane.bus.core import InterKernelBus

__all__ = ["BusConfig", "InterKernelBus", "MessageHandler", "Published", "ReceivedMessage"]
