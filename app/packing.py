"""Commands packed in C: redis-py's asyncio connection packs every command in Python
(its sync client uses hiredis when present). With fourteen arguments per reserve, that
packing was a quarter of the CPU a batch of reservations costs."""

from __future__ import annotations

from typing import Any

import hiredis
from redis.asyncio.connection import Connection


class PackedConnection(Connection):
    """A plain TCP connection whose commands hiredis packs, byte for byte as redis-py
    would; anything hiredis does not take (memoryviews, multi-word command names, bad
    types) goes redis-py's own way, with its own errors."""

    def pack_command(self, *args: Any) -> list[bytes]:
        head = args[0]
        if isinstance(head, str) and " " not in head:
            try:
                return [hiredis.pack_command(args)]
            except TypeError:
                pass
        return super().pack_command(*args)
