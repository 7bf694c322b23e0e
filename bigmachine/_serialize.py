"""Turning call arguments, replies and exceptions into segments and back.

A message is a list of segments: segment 0 is a pickle (protocol 5) stream,
the rest are the out-of-band buffers it refers to, sent and received without
copies. Plain pickle is tried first because it is fastest; cloudpickle is used
where plain pickle fails (lambdas, local functions) or where the stream names
``__main__`` (classes and functions of the driver's script, which a machine
cannot import).
"""
from __future__ import annotations

import io
import pickle
import traceback
from collections import ChainMap
from typing import Any

import cloudpickle

from . import _wire
from ._shmlink import Unreceived
from .errors import Error, RemoteError

# A message carries its buffers as a list; short ones ride in-band so that a
# message of many tiny arrays does not pay per-buffer framing.
INBAND_MAX = 512
# Out-of-band buffers one message can carry (segment 0 is the pickle stream).
MAX_BUFFERS = _wire.MAX_SEGMENTS - 1
_INBAND_ONLY = [False]  # the readonly flags of a message of one segment (never mutated)


def dumps(obj: Any) -> tuple[list, list]:
    """Return (segments, readonly flags) for obj."""
    # Most messages are small: one plain pickle does for them (a tenth of the
    # general path's cost) when no buffer travels out of band (a large one
    # stops it before it is copied) and the stream is too short to hold
    # bytes worth lifting.
    try:
        main = pickle.dumps(obj, 5, buffer_callback=_inband_only)
    except Exception:
        main = None
    if main is not None and len(main) < BYTES_OUT_OF_BAND and main.find(b"__main__") < 0:
        return [main], _INBAND_ONLY
    obj = _lift(obj, 0)
    main, buffers = _pickle(obj, INBAND_MAX)
    if len(buffers) > MAX_BUFFERS:
        # More buffers than one message carries: the smallest travel in band.
        sizes = sorted(buf.raw().nbytes for buf in buffers)
        main, buffers = _pickle(obj, sizes[len(sizes) - MAX_BUFFERS - 1])
    segments = [main]
    readonly = [False]
    for buf in buffers:
        raw = buf.raw()  # contiguous bytes view; non-contiguous arrays were copied by pickle
        segments.append(raw)
        readonly.append(raw.readonly)
    return segments, readonly


# Exact bytes and bytearray objects this large travel out of band when they
# are the message or sit near its top (a call's arguments, a reply's items).
# The C pickler copies them into the stream otherwise and offers no hook for
# them short of persistent_id, which would slow every message down. On
# arrival they are rebuilt with one copy: Python owns a bytes' memory.
BYTES_OUT_OF_BAND = 64 << 10
_LIFT_DEPTH = 2
_LIFT_WIDTH = 64


class _OutOfBandBytes:
    __slots__ = ("data",)

    def __init__(self, data: Any):
        self.data = data

    def __reduce_ex__(self, protocol: int) -> tuple:
        return type(self.data), (pickle.PickleBuffer(self.data),)


_LIFTABLE = (bytes, bytearray, tuple, list, dict)


def _lift(obj: Any, depth: int) -> Any:
    """obj, with large bytes/bytearray near its top wrapped to travel out of band."""
    kind = type(obj)
    if kind is bytes or kind is bytearray:
        return _OutOfBandBytes(obj) if len(obj) >= BYTES_OUT_OF_BAND else obj
    if depth >= _LIFT_DEPTH or kind not in _LIFTABLE or not obj or len(obj) > _LIFT_WIDTH:
        return obj
    values = obj.values() if kind is dict else obj
    if not any(type(v) in _LIFTABLE for v in values):
        return obj  # the common case: nothing below could need lifting
    if kind is dict:
        lifted = {k: _lift(v, depth + 1) for k, v in obj.items()}
        return lifted if any(lifted[k] is not v for k, v in obj.items()) else obj
    items = [_lift(x, depth + 1) for x in obj]
    return kind(items) if any(a is not b for a, b in zip(items, obj)) else obj


class _OutOfBand(Exception):
    """A buffer too large to travel in band: the general path is needed."""


def _inband_only(buf: pickle.PickleBuffer) -> bool:
    if buf.raw().nbytes > INBAND_MAX:
        raise _OutOfBand
    return True


def _pickle(obj: Any, inband_max: int) -> tuple[bytes, list]:
    """The pickle stream of obj, and the buffers larger than inband_max it left out."""
    buffers: list = []

    def keep(buf: pickle.PickleBuffer):
        if buf.raw().nbytes <= inband_max:
            return True
        buffers.append(buf)
        return False

    try:
        main = pickle.dumps(obj, protocol=5, buffer_callback=keep)
        if b"__main__" in main:
            raise pickle.PicklingError("refers to __main__")
    except Exception:
        buffers.clear()
        try:
            with io.BytesIO() as f:
                _Pickler(f, protocol=5, buffer_callback=keep).dump(obj)
                main = f.getvalue()
        except Exception as exc:
            raise Error(f"cannot pickle {_describe(obj)}: {exc}") from exc
    return main, buffers


def _reduce_memoryview(view: memoryview) -> tuple:
    """A memoryview travels as a buffer (out of band when large) and arrives
    as a memoryview of the same format, shape and writability."""
    if view.c_contiguous:
        flat = view.cast("B")
    else:
        data = view.tobytes()
        flat = memoryview(data if view.readonly else bytearray(data))
    try:
        flat.cast(view.format, view.shape)  # can it be rebuilt as it was?
    except (TypeError, ValueError):
        return bytes, (view.tobytes(),)  # a format memoryview.cast cannot make
    return _memoryview_from, (pickle.PickleBuffer(flat), view.format, view.shape)


def _memoryview_from(buf: Any, fmt: str, shape: tuple) -> memoryview:
    view = memoryview(buf)
    if fmt == "B" and len(shape) == 1:
        return view
    return view.cast("B").cast(fmt, shape)


class _Pickler(cloudpickle.CloudPickler):
    """cloudpickle (lambdas, __main__), with memoryviews kept as buffers."""

    dispatch_table = ChainMap({memoryview: _reduce_memoryview}, cloudpickle.CloudPickler.dispatch_table)


def loads(segments: list) -> Any:
    """Rebuild the object from received segments, without copying buffers.

    Raises ResourceError if a segment could not be received (see _shmlink).
    """
    if len(segments) == 1 and type(segments[0]) is not Unreceived:
        # Most messages: no buffers, no keyword to parse. pickle.loads is looked
        # up at each call: an audit that wraps it (tests/test_security.py) sees all.
        return pickle.loads(segments[0])
    for seg in segments:
        if type(seg) is Unreceived:
            raise seg.error
    return pickle.loads(segments[0], buffers=segments[1:])


def _describe(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 200 else text[:200] + "..."


class _RemoteTraceback(Exception):
    """Holds the remote traceback text so the usual printing shows it as the cause."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


def dump_exception(exc: BaseException) -> tuple[list, list]:
    """Segments for an exception raised by a remote method, with its traceback."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    qualname = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        message = str(exc)
    except Exception as failure:  # a broken __str__ must not leave its caller without a reply
        message = f"<str() of the exception failed: {type(failure).__name__}>"
    try:
        payload = cloudpickle.dumps(exc, protocol=5)
        pickle.loads(payload)  # the type must survive the trip to be useful
    except Exception:
        payload = None
    return dumps((payload, qualname, message, text))


def load_exception(segments: list) -> BaseException:
    """Rebuild the remote exception with its traceback attached as the cause."""
    payload, qualname, message, text = loads(segments)
    exc: BaseException
    try:
        exc = pickle.loads(payload) if payload is not None else None
    except Exception:
        exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(qualname, message, text)
    exc.__cause__ = _RemoteTraceback(text)
    try:
        exc.remote_traceback = text  # type: ignore[attr-defined]
    except AttributeError:
        pass  # a type with __slots__; the cause still carries the text
    return exc
