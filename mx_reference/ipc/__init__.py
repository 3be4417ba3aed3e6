"""Tensor IPC: a msgpack codec with out-of-band buffers, and the channels buffers travel through.

- :mod:`.codec`: :class:`Encoder` / :class:`Decoder`, the wire format, :class:`DecodeError`;
- :mod:`.shared`: the shared tensor channel over ``torch.multiprocessing`` queues;
- :mod:`.requests`: request scope, abort and TTL bookkeeping (outside the codec).
"""

from mx_reference.ipc.codec import (
    DEFAULT_INLINE_THRESHOLD,
    DecodeError,
    Decoder,
    Encoder,
    InlineChannel,
    TensorSink,
    TensorSource,
)
from mx_reference.ipc.requests import TensorBuffer, normalize_request_ids, request_scope
from mx_reference.ipc.shared import (
    ProducerGone,
    ReceiverStarved,
    SharedChannelConfig,
    SharedTensorReceiver,
    SharedTensorSender,
    TensorQueues,
    setup_sharing,
    was_received,
)

__all__ = [
    "DEFAULT_INLINE_THRESHOLD",
    "DecodeError",
    "Decoder",
    "Encoder",
    "InlineChannel",
    "ProducerGone",
    "ReceiverStarved",
    "SharedChannelConfig",
    "SharedTensorReceiver",
    "SharedTensorSender",
    "TensorBuffer",
    "TensorQueues",
    "TensorSink",
    "TensorSource",
    "normalize_request_ids",
    "request_scope",
    "setup_sharing",
    "was_received",
]
