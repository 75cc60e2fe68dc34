"""Small tensor checks shared by merge, adapter loading and weight loading."""

from __future__ import annotations

import torch


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN/Inf. max|t| propagates both, and is several times faster than
    ``isfinite(t).all()`` on CPU builds of torch (no full-size boolean temporary)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return bool(torch.isfinite(t.detach().abs().amax()))


def is_pickle_file(path) -> bool:
    """True for a torch.save zip (``PK``) or raw pickle (protocol byte 0x80) — without unpickling anything.

    A safetensors file is recognised first, by its layout (u64 little-endian header length N, then a JSON header
    starting with ``{`` that fits in the file): its first byte is N's low byte, which may itself be 0x80 or 'P',
    so sniffing the leading bytes alone would refuse a valid file.
    """
    import os
    import struct

    with open(path, "rb") as f:
        head = f.read(9)
    size = os.path.getsize(path)
    if len(head) == 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size:
        return False
    return head.startswith(b"PK") or head[:1] == b"\x80"
