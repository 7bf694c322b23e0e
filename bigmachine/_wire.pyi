from typing import Any, Optional

HEADER_SIZE: int
DESCRIPTOR_SIZE: int
KIND_MSG: int
KIND_DATA: int
KIND_CANCEL: int
KIND_CREDIT: int
KIND_PING: int
KIND_PONG: int
KIND_GOAWAY: int
KIND_MAX: int
FLAG_INLINE: int
MTYPE_REQUEST: int
MTYPE_REPLY: int
MTYPE_ERROR: int
MTYPE_ITEM: int
MTYPE_END: int
MTYPE_MAX: int
MFLAG_STREAM: int
READONLY_BIT: int
SHM_BIT: int
MAX_FDS: int
MAX_STREAM_ID: int
MAX_FRAME: int
MAX_SEGMENTS: int
MAX_MESSAGE: int
MAX_PENDING: int
INLINE_MAX: int
CHUNK: int
SMALL_SEGMENT: int
ALIGN: int
SCRATCH_SIZE: int

class WireError(ValueError): ...

def encode_header(kind: int, flags: int, stream_id: int, length: int) -> bytes: ...
def decode_header(data: bytes) -> tuple[int, int, int, int]: ...
def control_frame(kind: int, stream_id: int, value: int = ...) -> bytes: ...
def message_frames(stream_id: int, mtype: int, mflags: int, segments: list,
                   readonly: Optional[list] = ..., inline_max: int = ...,
                   chunk: int = ..., shm: Optional[list] = ...) -> tuple[list[list[Any]], int]: ...
