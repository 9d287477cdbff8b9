"""The byte layout of a codec blob (described in :mod:`coral_torch.codec`): magics, header and
plane-table structs, plane modes. The encoder (:mod:`coral_torch.codec`) and the reader
(:mod:`coral_torch.codec_reader`) both build on these definitions and on nothing of each other."""

from __future__ import annotations

import struct

MAGIC = b"CZP1"
MAGIC_CHUNKED = b"CZP2"
#: A frame's header: magic, itemsize, nplanes, reserved, raw_length.
HEADER = struct.Struct("<4sBBHQ")
#: One entry of a frame's plane table: mode, 7 pad bytes, payload_length.
PLANE = struct.Struct("<B7xQ")
#: A chunked blob's header: magic, itemsize, 2 reserved, raw_length, chunk_bytes.
CHUNKED = struct.Struct("<4sBBHQQ")
MODE_RAW = 0
MODE_ZSTD = 1
MAX_PLANES = 16
#: The longest a frame's header plus plane table can be.
MAX_FRAME_HEAD = HEADER.size + MAX_PLANES * PLANE.size
