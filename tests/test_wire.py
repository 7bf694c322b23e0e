"""Sans-IO tests of the frame codec (``bigmachine._wire``) and decoder (``bigmachine._decoder``).

No sockets: frames are built with the module's own encoders (or by hand, for
malformed input) and fed to a ``Decoder`` whole, byte by byte, in random
splits, and through the ``get_buffer()``/``buffer_updated()`` pair that the
connection's reader uses with ``recv_into``.
"""
from __future__ import annotations

import random
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bigmachine._buffers import aligned
from bigmachine._decoder import Decoder
from bigmachine._wire import (
    ALIGN,
    CHUNK,
    FLAG_INLINE,
    HEADER_SIZE,
    INLINE_MAX,
    KIND_CANCEL,
    KIND_CREDIT,
    KIND_DATA,
    KIND_GOAWAY,
    KIND_MAX,
    KIND_MSG,
    KIND_PING,
    KIND_PONG,
    MAX_FRAME,
    MAX_MESSAGE,
    MAX_SEGMENTS,
    MFLAG_STREAM,
    MTYPE_END,
    MTYPE_ERROR,
    MTYPE_ITEM,
    MTYPE_MAX,
    MTYPE_REPLY,
    MTYPE_REQUEST,
    READONLY_BIT,
    SMALL_SEGMENT,
    WireError,
    control_frame,
    decode_header,
    encode_header,
    message_frames,
)

pytestmark = pytest.mark.timeout(120)

U64_MAX = 2**64 - 1
HUGE_LENGTHS = [2**31, 2**63 - 1, U64_MAX]
MIB = 1 << 20

# Limits for fuzzing: small enough that no mutated length makes a test allocate
# much, large enough for every frame the strategies below generate.
FUZZ_LIMITS = dict(max_frame=1 << 14, max_segments=16, max_message=1 << 14,
                   max_pending=1 << 15, scratch_size=256)


# ---- helpers -----------------------------------------------------------------

def join(units) -> bytes:
    """The bytes of a list of frame units as message_frames returns them."""
    return b"".join(bytes(b) for unit in units for b in unit)


def msg(sid, mtype, mflags, segments, readonly=None, **kw) -> bytes:
    units, nbytes = message_frames(sid, mtype, mflags, list(segments), readonly, **kw)
    data = join(units)
    assert len(data) == nbytes
    return data


def raw_msg(sid, lengths, *, flags=0, mtype=MTYPE_REQUEST, mflags=0, reserved=0,
            nsegs=None, body=b"", length=None) -> bytes:
    """A MSG frame built by hand: descriptor, segment lengths, then ``body``."""
    nsegs = len(lengths) if nsegs is None else nsegs
    payload = struct.pack("<BBHI", mtype, mflags, reserved, nsegs)
    payload += b"".join(struct.pack("<Q", ln) for ln in lengths) + body
    n = len(payload) if length is None else length
    return encode_header(KIND_MSG, flags, sid, n) + payload


def raw_frame(kind, flags, sid, payload=b"", length=None, reserved=0) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack("<BBHIQ", kind, flags, reserved, sid, n) + payload


def data_frame(sid, payload) -> bytes:
    return encode_header(KIND_DATA, 0, sid, len(payload)) + payload


def address(buf) -> int:
    return np.frombuffer(buf, np.uint8).ctypes.data


def norm(events):
    """Events with segments turned into (bytes, readonly) pairs, comparable with ==."""
    out = []
    for ev in events:
        if ev[0] == KIND_MSG:
            segs = tuple((bytes(memoryview(s)), memoryview(s).readonly) for s in ev[4])
            out.append((ev[0], ev[1], ev[2], ev[3], segs))
        else:
            out.append(tuple(ev))
    return out


def msg_event(sid, mtype, mflags, segments, readonly=None):
    readonly = readonly or [False] * len(segments)
    return (KIND_MSG, sid, mtype, mflags,
            tuple((bytes(s), bool(r)) for s, r in zip(segments, readonly)))


def feed_whole(dec, data):
    return dec.feed(data)


def feed_bytewise(dec, data):
    events = []
    for i in range(len(data)):
        events.extend(dec.feed(data[i:i + 1]))
    return events


def feed_splits(dec, data, rng, maxpiece=None):
    events = []
    pos = 0
    maxpiece = maxpiece or max(1, len(data) // 3)
    while pos < len(data):
        k = rng.randint(1, maxpiece)
        events.extend(dec.feed(data[pos:pos + k]))
        pos += k
    return events


def feed_buffers(dec, data, rng=None, maxpiece=None):
    """Feed through get_buffer()/buffer_updated(), as recv_into would."""
    events = []
    pos = 0
    src = memoryview(data)
    while pos < len(data):
        buf = dec.get_buffer()
        assert len(buf) > 0, "get_buffer() returned an empty buffer: the reader would spin"
        assert not buf.readonly
        k = min(len(buf), len(data) - pos)
        if rng is not None:
            k = min(k, rng.randint(1, maxpiece or k))
        buf[:k] = src[pos:pos + k]
        pos += k
        events.extend(dec.buffer_updated(k))
    return events


def run(data, mode, seed=0, **limits):
    """("ok", events) or ("error",) for data fed to a fresh decoder in one mode."""
    dec = Decoder(**limits)
    rng = random.Random(seed)
    try:
        if mode == "whole":
            events = feed_whole(dec, data)
        elif mode == "bytewise":
            events = feed_bytewise(dec, data)
        elif mode == "splits":
            events = feed_splits(dec, data, rng)
        elif mode == "buffers":
            events = feed_buffers(dec, data, rng, max(1, len(data) // 3))
        else:
            raise AssertionError(mode)
    except WireError:
        return ("error",)
    return ("ok", norm(events))


MODES = ["whole", "bytewise", "splits", "buffers"]


def feeders():
    """(name, function(dec, data)) for each way of feeding, for parametrize."""
    return [
        ("whole", feed_whole),
        ("bytewise", feed_bytewise),
        ("splits", lambda d, b: feed_splits(d, b, random.Random(1))),
        ("smallsplits", lambda d, b: feed_splits(d, b, random.Random(2), 7)),
        ("buffers", lambda d, b: feed_buffers(d, b)),
        ("buffersplits", lambda d, b: feed_buffers(d, b, random.Random(3), 5)),
    ]


FEEDERS = feeders()
FEEDER_IDS = [name for name, _ in FEEDERS]
SMALL_FEEDERS = [f for _, f in FEEDERS]


def test_constants():
    kinds = [KIND_MSG, KIND_DATA, KIND_CANCEL, KIND_CREDIT, KIND_PING, KIND_PONG, KIND_GOAWAY]
    assert sorted(kinds) == list(range(1, KIND_MAX + 1))
    mtypes = [MTYPE_REQUEST, MTYPE_REPLY, MTYPE_ERROR, MTYPE_ITEM, MTYPE_END]
    assert sorted(mtypes) == list(range(1, MTYPE_MAX + 1))
    assert HEADER_SIZE == 16 and ALIGN == 64 and READONLY_BIT == 1 << 63
    assert INLINE_MAX < CHUNK <= MAX_FRAME
    assert issubclass(WireError, ValueError)


# ---- header codec ------------------------------------------------------------

@pytest.mark.parametrize("kind,flags,sid,length", [
    (KIND_MSG, FLAG_INLINE, 1, 0), (KIND_DATA, 0, 2**32 - 1, U64_MAX),
    (KIND_PING, 0, 0, 8), (255, 255, 12345, 2**63 - 1),
])
def test_header_roundtrip(kind, flags, sid, length):
    h = encode_header(kind, flags, sid, length)
    assert len(h) == HEADER_SIZE
    assert h == struct.pack("<BBHIQ", kind, flags, 0, sid, length)
    assert decode_header(h) == (kind, flags, sid, length)
    assert decode_header(h + b"more") == (kind, flags, sid, length)


def test_decode_header_errors():
    with pytest.raises(WireError):
        decode_header(encode_header(KIND_PING, 0, 0, 8)[:15])
    with pytest.raises(WireError):
        decode_header(raw_frame(KIND_PING, 0, 0, bytes(8), reserved=1))


def test_control_frame_bytes():
    assert control_frame(KIND_CANCEL, 7) == encode_header(KIND_CANCEL, 0, 7, 0)
    assert control_frame(KIND_CREDIT, 7, 99) == (
        encode_header(KIND_CREDIT, 0, 7, 8) + struct.pack("<Q", 99))
    assert control_frame(KIND_PING, 0, U64_MAX) == (
        encode_header(KIND_PING, 0, 0, 8) + b"\xff" * 8)


# ---- every frame kind, every way of feeding -----------------------------------

CONTROL_CASES = [
    (control_frame(KIND_CANCEL, 3), (KIND_CANCEL, 3, 0)),
    (control_frame(KIND_CANCEL, 2**32 - 1), (KIND_CANCEL, 2**32 - 1, 0)),
    (control_frame(KIND_CREDIT, 5, 17), (KIND_CREDIT, 5, 17)),
    (control_frame(KIND_CREDIT, 5, U64_MAX), (KIND_CREDIT, 5, U64_MAX)),
    (control_frame(KIND_PING, 0, 0xDEADBEEF), (KIND_PING, 0, 0xDEADBEEF)),
    (control_frame(KIND_PONG, 0, 2**63 + 1), (KIND_PONG, 0, 2**63 + 1)),
    (control_frame(KIND_GOAWAY, 0, 0), (KIND_GOAWAY, 0, 0)),
]


@pytest.mark.parametrize("feed", SMALL_FEEDERS, ids=FEEDER_IDS)
@pytest.mark.parametrize("frame,event", CONTROL_CASES,
                         ids=[f"kind{e[0]}-{e[2]}" for _, e in CONTROL_CASES])
def test_control_frames(feed, frame, event):
    dec = Decoder()
    assert feed(dec, frame) == [event]
    assert dec.open_streams == [] and dec.pending_bytes == 0


def _small_messages():
    """(bytes, expected event) for messages small enough to feed byte by byte."""
    cases = []
    cases.append((msg(1, MTYPE_REQUEST, 0, [b"pickle"]),
                  msg_event(1, MTYPE_REQUEST, 0, [b"pickle"])))
    cases.append((msg(2, MTYPE_REPLY, MFLAG_STREAM, [b""]),
                  msg_event(2, MTYPE_REPLY, MFLAG_STREAM, [b""])))
    segs = [b"p" * 10, b"", b"abc", bytes(range(256)), b"z"]
    ro = [False, True, True, False, True]
    cases.append((msg(3, MTYPE_ITEM, 0, segs, ro), msg_event(3, MTYPE_ITEM, 0, segs, ro)))
    # The same message forced through DATA frames, cut at odd places.
    for chunk in (1, 7, 100, CHUNK):
        cases.append((msg(4, MTYPE_ERROR, 0, segs, ro, inline_max=0, chunk=chunk),
                      msg_event(4, MTYPE_ERROR, 0, segs, ro)))
    cases.append((msg(2**32 - 1, MTYPE_END, 0, [b"x" * 300], inline_max=10, chunk=64),
                  msg_event(2**32 - 1, MTYPE_END, 0, [b"x" * 300])))
    return cases


SMALL_MESSAGES = _small_messages()


@pytest.mark.parametrize("feed", SMALL_FEEDERS, ids=FEEDER_IDS)
@pytest.mark.parametrize("case", range(len(SMALL_MESSAGES)))
def test_small_messages(feed, case):
    data, event = SMALL_MESSAGES[case]
    dec = Decoder()
    assert norm(feed(dec, data)) == [event]
    assert dec.open_streams == [] and dec.pending_bytes == 0


def test_segment_count_limits():
    with pytest.raises(WireError):
        message_frames(1, MTYPE_REQUEST, 0, [])
    with pytest.raises(WireError):
        message_frames(1, MTYPE_REQUEST, 0, [b""] * (MAX_SEGMENTS + 1))
    segs = [b"p"] + [b""] * (MAX_SEGMENTS - 2) + [b"last"]
    (ev,) = Decoder().feed(msg(1, MTYPE_REQUEST, 0, segs))
    assert len(ev[4]) == MAX_SEGMENTS and bytes(ev[4][-1]) == b"last"


def test_inline_is_one_frame_and_chunked_is_not():
    units, _ = message_frames(1, MTYPE_REQUEST, 0, [b"a" * INLINE_MAX])
    assert len(units) == 1 and decode_header(units[0][0])[1] == FLAG_INLINE
    units, _ = message_frames(1, MTYPE_REQUEST, 0, [b"a" * INLINE_MAX, b"b"])
    assert len(units) == 2 and decode_header(units[0][0])[1] == 0
    assert decode_header(units[1][0])[:3] == (KIND_DATA, 0, 1)


def _sequence():
    """Several frames of every kind back to back, with their events and end offsets."""
    parts = [
        (control_frame(KIND_PING, 0, 1), [(KIND_PING, 0, 1)]),
        (msg(1, MTYPE_REQUEST, 0, [b"hello", b"ro"], [False, True]),
         [msg_event(1, MTYPE_REQUEST, 0, [b"hello", b"ro"], [False, True])]),
        (control_frame(KIND_CREDIT, 1, 4), [(KIND_CREDIT, 1, 4)]),
        (msg(3, MTYPE_ITEM, MFLAG_STREAM, [b"q" * 40, b"w" * 30], [True, False],
             inline_max=0, chunk=16),
         [msg_event(3, MTYPE_ITEM, MFLAG_STREAM, [b"q" * 40, b"w" * 30], [True, False])]),
        (control_frame(KIND_CANCEL, 3), [(KIND_CANCEL, 3, 0)]),
        (control_frame(KIND_PONG, 0, 2), [(KIND_PONG, 0, 2)]),
        # stream 3 again, now that its first message is complete
        (msg(3, MTYPE_END, 0, [b""]), [msg_event(3, MTYPE_END, 0, [b""])]),
        (control_frame(KIND_GOAWAY, 0, 0), [(KIND_GOAWAY, 0, 0)]),
    ]
    data = b""
    ends = []
    events = []
    for frame, evs in parts:
        data += frame
        for ev in evs:
            events.append(ev)
            ends.append(len(data))
    return data, events, ends


def test_sequence_events_arrive_exactly_when_frames_complete():
    data, events, ends = _sequence()
    dec = Decoder()
    seen = []
    for i in range(len(data)):
        for ev in norm(dec.feed(data[i:i + 1])):
            seen.append((ev, i + 1))
    assert seen == list(zip(events, ends))


def test_every_prefix_is_pending_not_an_error():
    data, events, ends = _sequence()
    for k in range(len(data) + 1):
        for feed in (feed_whole, feed_buffers):
            dec = Decoder()
            got = norm(feed(dec, data[:k]))
            assert got == [ev for ev, end in zip(events, ends) if end <= k], k
            # ... and the rest completes it.
            assert norm(feed(dec, data[k:])) == [ev for ev, end in zip(events, ends) if end > k]


@pytest.mark.parametrize("feed", SMALL_FEEDERS, ids=FEEDER_IDS)
def test_trailing_bytes_stay_pending(feed):
    first = control_frame(KIND_PING, 0, 42)
    second = msg(5, MTYPE_REPLY, 0, [b"abcdef" * 10])
    for k in range(1, len(second)):
        dec = Decoder()
        assert feed(dec, first + second[:k]) == [(KIND_PING, 0, 42)]
        assert norm(dec.feed(second[k:])) == [msg_event(5, MTYPE_REPLY, 0, [b"abcdef" * 10])]


def test_random_splits_of_a_sequence():
    data, events, _ = _sequence()
    data = data * 3
    rng = random.Random(1234)
    for _ in range(200):
        dec = Decoder()
        assert norm(feed_splits(dec, data, rng, rng.choice([1, 3, 17, len(data)]))) \
            == events * 3
        dec = Decoder()
        assert norm(feed_buffers(dec, data, rng, rng.choice([1, 3, 17, len(data)]))) \
            == events * 3


# ---- large messages: chunking, segment layout, alignment, read-only ----------

def _large_message():
    rng = np.random.default_rng(7)
    segs = [
        rng.bytes(100),                  # the pickle stream
        b"",                             # an empty out-of-band buffer
        rng.bytes(1),
        rng.bytes(INLINE_MAX + 3),       # small segment, shares the region
        rng.bytes(SMALL_SEGMENT - 1),    # largest small segment
        rng.bytes(SMALL_SEGMENT),        # smallest segment with its own memory
        rng.bytes(CHUNK + 12345),        # spans DATA frames
        rng.bytes(3),
    ]
    ro = [False, True, False, True, False, True, True, False]
    return segs, ro


LARGE_SEGS, LARGE_RO = _large_message()


def _check_large(events, sid=9):
    assert len(events) == 1
    kind, got_sid, mtype, mflags, segs = events[0]
    assert (kind, got_sid, mtype, mflags) == (KIND_MSG, sid, MTYPE_REQUEST, 0)
    assert len(segs) == len(LARGE_SEGS)
    for seg, want, ro in zip(segs, LARGE_SEGS, LARGE_RO):
        view = memoryview(seg)
        assert view.readonly == ro
        assert view.nbytes == len(want)
        assert view == want
        if len(want):
            assert address(seg) % 64 == 0
            assert np.frombuffer(seg, np.uint8).flags.writeable == (not ro)


@pytest.mark.parametrize("mode", ["whole", "splits", "tinysplits", "buffers", "buffersplits"])
def test_large_message(mode):
    units, nbytes = message_frames(9, MTYPE_REQUEST, 0, LARGE_SEGS, LARGE_RO)
    data = join(units)
    assert len(units) > 3 and len(data) == nbytes
    total = sum(map(len, LARGE_SEGS))
    for unit in units[1:]:
        kind, flags, sid, length = decode_header(unit[0])
        assert (kind, flags, sid) == (KIND_DATA, 0, 9) and 0 < length <= CHUNK
    dec = Decoder(alloc=aligned)
    rng = random.Random(5)
    if mode == "whole":
        events = dec.feed(data)
    elif mode == "splits":
        events = feed_splits(dec, data, rng, 300_000)
    elif mode == "tinysplits":
        # Byte by byte around every frame boundary, bigger pieces in between.
        events = []
        pos = 0
        bounds = set()
        for unit in units:
            pos += sum(len(memoryview(b)) for b in unit)
            bounds.update(range(pos - 20, pos + 20))
        pos = 0
        while pos < len(data):
            k = 1 if pos in bounds else rng.randint(1, 70_000)
            events.extend(dec.feed(data[pos:pos + k]))
            pos += k
    elif mode == "buffers":
        events = feed_buffers(dec, data)
    else:
        events = feed_buffers(dec, data, rng, 100_000)
    _check_large(events)
    assert dec.pending_bytes == 0 and dec.open_streams == []
    assert total > INLINE_MAX


@pytest.mark.parametrize("ro", [False, True])
def test_chunked_message_whose_small_segments_are_all_empty(ro):
    """No small segment has a byte, so the shared small region is empty (it was
    None, and slicing it raised TypeError instead of decoding)."""
    segs = [b"", b"x" * (CHUNK + 5), b""]
    data = msg(4, MTYPE_REQUEST, 0, segs, [ro, False, ro])
    assert decode_header(data[:HEADER_SIZE])[0] == KIND_MSG
    for feed in (feed_whole, feed_bytewise):
        dec = Decoder(alloc=aligned)
        events = feed(dec, data)
        assert len(events) == 1
        got = events[0][4]
        assert [bytes(s) for s in got] == segs
        assert [memoryview(s).readonly for s in got] == [ro, False, ro]


def test_large_message_pending_accounting():
    units, _ = message_frames(9, MTYPE_REQUEST, 0, LARGE_SEGS, LARGE_RO)
    dec = Decoder(alloc=aligned)
    assert dec.feed(join(units[:1])) == []
    assert dec.open_streams == [9]
    assert dec.pending_bytes == sum(map(len, LARGE_SEGS))
    assert dec.feed(join(units[1:-1])) == []
    _check_large(dec.feed(join(units[-1:])))
    assert dec.pending_bytes == 0


@pytest.mark.parametrize("inline", [True, False])
def test_alignment_of_every_segment(inline):
    sizes = [0, 1, 63, 64, 65, 100, 1000, 4097]
    rng = np.random.default_rng(1)
    segs = [rng.bytes(n) for n in sizes]
    data = msg(1, MTYPE_REPLY, 0, segs, inline_max=INLINE_MAX if inline else 0, chunk=333)
    events = Decoder(alloc=aligned).feed(data)
    assert norm(events) == [msg_event(1, MTYPE_REPLY, 0, segs)]
    for seg, n in zip(events[0][4], sizes):
        if n:
            assert address(seg) % 64 == 0, n


@pytest.mark.parametrize("inline", [True, False])
def test_readonly_flags_preserved(inline):
    segs = [b"pickle", b"a" * 10, b"b" * 20, b"c" * 30]
    ro = [True, False, True, False]
    units, _ = message_frames(1, MTYPE_REQUEST, 0, segs, ro,
                              inline_max=INLINE_MAX if inline else 0)
    hdr_lengths = struct.unpack("<4Q", bytes(units[0][0])[24:56])
    assert [bool(ln & READONLY_BIT) for ln in hdr_lengths] == ro
    assert [ln & ~READONLY_BIT for ln in hdr_lengths] == [len(s) for s in segs]
    for alloc in (bytearray, aligned):
        (ev,) = Decoder(alloc=alloc).feed(join(units))
        assert [memoryview(s).readonly for s in ev[4]] == ro
        with pytest.raises(TypeError):
            memoryview(ev[4][0])[0] = 1
        memoryview(ev[4][1])[0] = 1  # a writable segment can be written


def test_message_frames_accepts_any_contiguous_buffer():
    arr = np.arange(12, dtype=np.float64).reshape(3, 4)
    data = msg(1, MTYPE_REQUEST, 0, [b"p", arr, memoryview(b"xyz")], inline_max=0, chunk=10)
    (ev,) = Decoder(alloc=aligned).feed(data)
    assert bytes(memoryview(ev[4][1])) == arr.tobytes()
    out = np.frombuffer(ev[4][1], np.float64).reshape(3, 4)
    assert (out == arr).all()


def test_interleaved_streams():
    rng = np.random.default_rng(3)
    a = [rng.bytes(50), rng.bytes(3 * CHUNK // 2), rng.bytes(7)]
    b = [rng.bytes(20), rng.bytes(SMALL_SEGMENT + 1)]
    ua, _ = message_frames(1, MTYPE_REQUEST, 0, a, [False, True, False])
    ub, _ = message_frames(2, MTYPE_REPLY, MFLAG_STREAM, b, chunk=CHUNK // 4)
    assert len(ua) >= 3 and len(ub) >= 3
    order = [ua[0], ub[0]]
    ia, ib = ua[1:], ub[1:]
    # alternate DATA frames, with control frames between them
    while ia or ib:
        if ib:
            order.append(ib.pop(0))
        order.append([control_frame(KIND_CREDIT, 1, len(order))])
        if ia:
            order.append(ia.pop(0))
    data = join(order)
    want_a = msg_event(1, MTYPE_REQUEST, 0, a, [False, True, False])
    want_b = msg_event(2, MTYPE_REPLY, MFLAG_STREAM, b)
    for mode in ("whole", "splits", "buffers"):
        dec = Decoder(alloc=aligned)
        if mode == "whole":
            events = dec.feed(data)
        elif mode == "splits":
            events = feed_splits(dec, data, random.Random(9), 200_000)
        else:
            events = feed_buffers(dec, data, random.Random(9), 200_000)
        msgs = [e for e in norm(events) if e[0] == KIND_MSG]
        credits = [e for e in events if e[0] == KIND_CREDIT]
        assert sorted(msgs) == sorted([want_a, want_b])
        assert len(credits) == max(len(ua), len(ub)) - 1
        for e in events:
            if e[0] == KIND_MSG:
                for s in e[4]:
                    if len(memoryview(s)):
                        assert address(s) % 64 == 0
        assert dec.pending_bytes == 0


# ---- zero copy through get_buffer()/buffer_updated() --------------------------

def feed_frame_by_frame(dec, units):
    """Feed whole frames the way a reader that knows the framing would: each DATA
    header into scratch space, then its payload into whatever get_buffer() hands
    out, as much as it allows. Returns (events, [(address, nbytes)] of the
    buffers that received DATA payload)."""
    events = []
    writes = []
    for unit in units:
        frame = b"".join(bytes(b) for b in unit)
        kind, _, _, length = decode_header(frame)
        head = frame if kind != KIND_DATA else frame[:HEADER_SIZE]
        buf = dec.get_buffer()
        assert len(buf) >= len(head)
        buf[:len(head)] = head
        events.extend(dec.buffer_updated(len(head)))
        if kind != KIND_DATA:
            continue
        pos = HEADER_SIZE
        while pos < len(frame):
            buf = dec.get_buffer()
            assert 0 < len(buf) <= len(frame) - pos
            buf[:] = frame[pos:pos + len(buf)]
            writes.append((address(buf), len(buf)))
            pos += len(buf)
            events.extend(dec.buffer_updated(len(buf)))
    return events, writes


def test_get_buffer_hands_out_the_final_segment_memory():
    """Bulk bytes are written by the caller straight into the emitted segment."""
    big_size = 2 * CHUNK + 1000
    pattern = np.random.default_rng(11).bytes(big_size)
    units, _ = message_frames(7, MTYPE_REPLY, 0, [b"pickle-bytes", pattern])
    assert len(units) == 4
    dec = Decoder(alloc=aligned)
    events, writes = feed_frame_by_frame(dec, units)
    assert len(events) == 1
    seg0, seg1 = events[0][4]
    assert bytes(memoryview(seg0)) == b"pickle-bytes"
    assert bytes(memoryview(seg1)) == pattern
    base = address(seg1)
    assert base % 64 == 0
    # The first buffer of the first DATA frame is the small segment; then the
    # buffers start at the big segment and follow each other contiguously:
    # every payload byte was written in place, none went through scratch space.
    assert writes[0] == (address(seg0), len(b"pickle-bytes"))
    expect = base
    for addr, n in writes[1:]:
        assert addr == expect
        expect += n
    assert expect == base + big_size
    assert len(writes) == len(units)  # one buffer per DATA frame, plus the small one
    # Mutate and observe: the segment is the memory that was handed out.
    np.frombuffer(seg1, np.uint8)[:4] = 0
    assert bytes(memoryview(seg1)[:4]) == bytes(4)


def test_get_buffer_direct_buffers_for_many_segments():
    """DATA payload spanning several segments is handed out segment by segment."""
    segs = [b"p" * 5] + [bytes([i]) * (SMALL_SEGMENT + i) for i in range(1, 4)] + [b"s" * 99]
    ro = [False, True, False, True, True]
    units, _ = message_frames(3, MTYPE_REQUEST, 0, segs, ro, chunk=SMALL_SEGMENT // 2 + 17)
    dec = Decoder(alloc=aligned)
    events, writes = feed_frame_by_frame(dec, units)
    assert norm(events) == [msg_event(3, MTYPE_REQUEST, 0, segs, ro)]
    got = events[0][4]
    assert sum(n for _, n in writes) == sum(map(len, segs))
    for seg in got:
        lo = address(seg)
        hi = lo + len(memoryview(seg))
        assert lo % 64 == 0
        inside = [(a, n) for a, n in writes if lo <= a < hi]
        assert all(a + n <= hi for a, n in inside)
        assert sum(n for _, n in inside) == hi - lo  # every byte written in place


# ---- failure paths -------------------------------------------------------------

def _pending_msg(sid, n):
    """A chunked MSG frame announcing one segment of n bytes (no DATA yet)."""
    return raw_msg(sid, [n])


FAILURES = {
    # header
    "kind 0": (raw_frame(0, 0, 0, bytes(8)), {}),
    "kind 8": (raw_frame(8, 0, 0, bytes(8)), {}),
    "kind 255": (raw_frame(255, 0, 1, b""), {}),
    "reserved bits low": (raw_frame(KIND_PING, 0, 0, bytes(8), reserved=1), {}),
    "reserved bits high": (raw_frame(KIND_MSG, FLAG_INLINE, 1, b"", reserved=0x8000), {}),
    "reserved bits DATA": (_pending_msg(1, 10) + raw_frame(KIND_DATA, 0, 1, bytes(10),
                                                           reserved=2), {}),
    # flags
    "flags CANCEL": (raw_frame(KIND_CANCEL, 1, 1), {}),
    "flags CREDIT": (raw_frame(KIND_CREDIT, 1, 1, bytes(8)), {}),
    "flags PING": (raw_frame(KIND_PING, 2, 0, bytes(8)), {}),
    "flags PONG": (raw_frame(KIND_PONG, 128, 0, bytes(8)), {}),
    "flags GOAWAY": (raw_frame(KIND_GOAWAY, 1, 0, bytes(8)), {}),
    "flags DATA": (_pending_msg(1, 10) + raw_frame(KIND_DATA, 1, 1, bytes(10)), {}),
    "flags MSG": (raw_msg(1, [1], flags=2 | FLAG_INLINE, body=b"x"), {}),
    # frame length
    "frame above max_frame": (raw_frame(KIND_PING, 0, 0, length=MAX_FRAME + 1), {}),
    "MSG above max_frame": (raw_frame(KIND_MSG, FLAG_INLINE, 1, length=1001),
                            dict(max_frame=1000)),
    "DATA above max_frame": (_pending_msg(1, 5000) + raw_frame(KIND_DATA, 0, 1, length=1001),
                             dict(max_frame=1000)),
    # message length
    "segment above max_message": (_pending_msg(1, 1001), dict(max_message=1000)),
    "sum above max_message": (raw_msg(1, [500, 500, 1]), dict(max_message=1000)),
    "inline above max_message": (raw_msg(1, [1001], flags=FLAG_INLINE, body=bytes(1001)),
                                 dict(max_message=1000)),
    "segment length 2**63-1": (_pending_msg(1, 2**63 - 1), {}),
    "segment length 2**64-1": (_pending_msg(1, U64_MAX), {}),
    "segment lengths overflow": (raw_msg(1, [MAX_MESSAGE, 2**63 - MAX_MESSAGE]), {}),
    # segments
    "too many segments": (raw_msg(1, [1] * 5), dict(max_segments=4)),
    "nsegs 2**32-1": (raw_msg(1, [], nsegs=2**32 - 1, length=8), {}),
    "nsegs 0": (raw_msg(1, [], nsegs=0), {}),
    "truncated descriptor": (raw_msg(1, [1, 2], nsegs=3), {}),
    "short descriptor": (raw_frame(KIND_MSG, 0, 1, b"\x01\x00\x00"), {}),
    "empty MSG": (raw_frame(KIND_MSG, FLAG_INLINE, 1, b""), {}),
    "inline length mismatch short": (raw_msg(1, [4], flags=FLAG_INLINE, body=b"abc"), {}),
    "inline length mismatch long": (raw_msg(1, [4], flags=FLAG_INLINE, body=b"abcde"), {}),
    "chunked descriptor trailing bytes": (raw_msg(1, [4], body=b"x"), {}),
    "chunked empty message": (raw_msg(1, [0, 0]), {}),
    "mtype 0": (raw_msg(1, [0], flags=FLAG_INLINE, mtype=0), {}),
    "mtype 6": (raw_msg(1, [0], flags=FLAG_INLINE, mtype=MTYPE_MAX + 1), {}),
    "mflags unknown": (raw_msg(1, [0], flags=FLAG_INLINE, mflags=2), {}),
    "descriptor reserved": (raw_msg(1, [0], flags=FLAG_INLINE, reserved=1), {}),
    # pending
    "pending above max_pending": (_pending_msg(1, 600) + _pending_msg(3, 600),
                                  dict(max_pending=1000)),
    "one message above max_pending": (_pending_msg(1, 1001), dict(max_pending=1000)),
    # streams
    "DATA unknown stream": (data_frame(1, b"abc"), {}),
    "DATA other stream": (_pending_msg(1, 10) + data_frame(3, b"abc"), {}),
    "DATA after message complete": (_pending_msg(1, 3) + data_frame(1, b"abc")
                                    + data_frame(1, b"d"), {}),
    "DATA longer than message": (_pending_msg(1, 10) + data_frame(1, bytes(11)), {}),
    "DATA longer than rest": (_pending_msg(1, 10) + data_frame(1, bytes(6))
                              + data_frame(1, bytes(5)), {}),
    "DATA empty": (_pending_msg(1, 10) + data_frame(1, b""), {}),
    "duplicate stream chunked": (_pending_msg(1, 10) + _pending_msg(1, 10), {}),
    "duplicate stream inline": (_pending_msg(1, 10) + msg(1, MTYPE_REQUEST, 0, [b"x"]), {}),
    "duplicate stream mid DATA": (_pending_msg(1, 10) + data_frame(1, bytes(4))
                                  + msg(1, MTYPE_REQUEST, 0, [b"x"]), {}),
    "message on stream 0": (msg(0, MTYPE_REQUEST, 0, [b"x"]), {}),
    "chunked message on stream 0": (_pending_msg(0, 10), {}),
    # control frame payloads
    "CANCEL with payload": (raw_frame(KIND_CANCEL, 0, 1, bytes(8)), {}),
    "CREDIT empty": (raw_frame(KIND_CREDIT, 0, 1, b""), {}),
    "CREDIT 4 bytes": (raw_frame(KIND_CREDIT, 0, 1, bytes(4)), {}),
    "CREDIT 16 bytes": (raw_frame(KIND_CREDIT, 0, 1, bytes(16)), {}),
    "PING empty": (raw_frame(KIND_PING, 0, 0, b""), {}),
    "PING 7 bytes": (raw_frame(KIND_PING, 0, 0, bytes(7)), {}),
    "PING 9 bytes": (raw_frame(KIND_PING, 0, 0, bytes(9)), {}),
    "PONG 0 bytes": (raw_frame(KIND_PONG, 0, 0, b""), {}),
    "GOAWAY 16 bytes": (raw_frame(KIND_GOAWAY, 0, 0, bytes(16)), {}),
    # control frame streams
    "PING on stream 1": (control_frame(KIND_PING, 1, 0), {}),
    "PONG on stream 2": (control_frame(KIND_PONG, 2, 0), {}),
    "GOAWAY on stream 3": (control_frame(KIND_GOAWAY, 3, 0), {}),
    "CREDIT on stream 0": (control_frame(KIND_CREDIT, 0, 5), {}),
    "CANCEL on stream 0": (control_frame(KIND_CANCEL, 0), {}),
}


@pytest.mark.parametrize("feed", SMALL_FEEDERS, ids=FEEDER_IDS)
@pytest.mark.parametrize("name", list(FAILURES))
def test_failure(name, feed):
    data, limits = FAILURES[name]
    dec = Decoder(**limits)
    with pytest.raises(WireError):
        feed(dec, data)


@pytest.mark.parametrize("name", list(FAILURES))
def test_failure_after_valid_frames(name):
    """The same failures, after valid traffic has set up decoder state."""
    data, limits = FAILURES[name]
    prefix = (control_frame(KIND_PING, 0, 1) + msg(101, MTYPE_REQUEST, 0, [b"ok"])
              + msg(103, MTYPE_REQUEST, 0, [b"ab" * 50], inline_max=0, chunk=33))
    dec = Decoder(**limits)
    assert len(dec.feed(prefix)) == 3
    with pytest.raises(WireError):
        dec.feed(data)


@pytest.mark.parametrize("kind", [KIND_MSG, KIND_DATA, KIND_CANCEL, KIND_CREDIT,
                                  KIND_PING, KIND_PONG, KIND_GOAWAY])
@pytest.mark.parametrize("length", HUGE_LENGTHS + [MAX_FRAME + 1])
def test_huge_frame_length_rejected_before_allocating(kind, length):
    calls = []

    def alloc(n):
        calls.append(n)
        return aligned(n)

    setup = _pending_msg(1, 1 << 30) if kind == KIND_DATA else b""
    dec = Decoder(alloc=alloc)
    dec.feed(setup)
    calls.clear()
    header = raw_frame(kind, 0, 1, length=length)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(WireError):
            dec.feed(header + bytes(64))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MIB, peak
    assert calls == []


@pytest.mark.parametrize("name", ["segment length 2**63-1", "segment length 2**64-1",
                                  "segment lengths overflow", "nsegs 2**32-1"])
def test_huge_descriptor_rejected_before_allocating(name):
    data, limits = FAILURES[name]
    calls = []
    dec = Decoder(alloc=lambda n: calls.append(n) or bytearray(n), **limits)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(WireError):
            dec.feed(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MIB, peak
    assert calls == []


@pytest.mark.parametrize("kind,sid,length", [
    (KIND_CANCEL, 1, 8), (KIND_CREDIT, 1, MAX_FRAME), (KIND_PING, 0, MAX_FRAME),
    (KIND_PONG, 0, 9), (KIND_GOAWAY, 0, 1 << 20),
])
def test_control_frame_length_rejected_at_its_header(kind, sid, length):
    """A control frame's length is fixed: no need to buffer a bogus payload first."""
    dec = Decoder()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(WireError):
            dec.feed(raw_frame(kind, 0, sid, length=length))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MIB, peak


def test_allocation_failure_is_a_wire_error():
    """A message the receiver cannot allocate closes the connection, like any bad frame.

    (An inline message's pickle stream, segment 0, is not allocated by alloc:
    it is a bytearray of at most one frame, so the inline case has a buffer.)"""
    def alloc(n):
        raise MemoryError(f"cannot allocate {n} bytes")

    for data in (_pending_msg(1, 1 << 30), raw_msg(1, [5, 1 << 21, 3]),
                 raw_msg(1, [3, 2], flags=FLAG_INLINE, body=b"abcde")):
        with pytest.raises(WireError):
            Decoder(alloc=alloc).feed(data)


def test_largest_allowed_message_decodes_or_is_a_wire_error():
    """A peer announcing MAX_MESSAGE bytes: the aligned allocator reserves address
    space only, which a host may or may not grant; either way no MemoryError."""
    dec = Decoder(alloc=aligned)
    try:
        assert dec.feed(_pending_msg(1, MAX_MESSAGE)) == []
    except WireError:
        return
    assert dec.pending_bytes == MAX_MESSAGE
    dec.close()


def test_message_limits_are_inclusive():
    dec = Decoder(max_message=1000, max_pending=1000, max_segments=3, max_frame=1000)
    assert dec.feed(_pending_msg(1, 1000)) == []
    assert dec.pending_bytes == 1000
    assert norm(dec.feed(data_frame(1, bytes(1000)))) == [
        msg_event(1, MTYPE_REQUEST, 0, [bytes(1000)])]
    assert dec.pending_bytes == 0
    assert len(dec.feed(msg(1, MTYPE_REQUEST, 0, [b"a", b"b", b"c"]))) == 1
    assert dec.feed(raw_frame(KIND_PING, 0, 0, bytes(8))) == [(KIND_PING, 0, 0)]


def test_close_drops_partial_messages():
    dec = Decoder()
    dec.feed(_pending_msg(1, 10) + _pending_msg(5, 10) + data_frame(1, b"abc"))
    assert sorted(dec.open_streams) == [1, 5] and dec.pending_bytes == 20
    assert sorted(dec.close()) == [1, 5]
    assert dec.closed and dec.open_streams == [] and dec.pending_bytes == 0


# ---- property tests ------------------------------------------------------------

def outcomes(data, seed=0, **limits):
    return {mode: run(data, mode, seed, **limits) for mode in MODES}


def assert_consistent(data, seed=0, **limits):
    got = outcomes(data, seed, **limits)
    first = got["whole"]
    for mode, res in got.items():
        if first[0] == "error":
            assert res[0] == "error", (mode, res)
        else:
            assert res == first, mode
    event(f"outcome: {first[0]}")
    return first


sids = st.integers(1, 2**32 - 1)
u64 = st.integers(0, U64_MAX)
segment_lists = st.lists(st.binary(max_size=40), min_size=1, max_size=5)


@st.composite
def control_items(draw):
    kind = draw(st.sampled_from([KIND_CANCEL, KIND_CREDIT, KIND_PING, KIND_PONG, KIND_GOAWAY]))
    if kind == KIND_CANCEL:
        sid = draw(sids)
        return [[control_frame(kind, sid)]], (kind, sid, 0)
    if kind == KIND_CREDIT:
        sid, v = draw(sids), draw(u64)
        return [[control_frame(kind, sid, v)]], (kind, sid, v)
    v = 0 if kind == KIND_GOAWAY else draw(u64)
    return [[control_frame(kind, 0, v)]], (kind, 0, v)


@st.composite
def message_items(draw, sid):
    segs = draw(segment_lists)
    ro = draw(st.lists(st.booleans(), min_size=len(segs), max_size=len(segs)))
    mtype = draw(st.integers(1, MTYPE_MAX))
    mflags = draw(st.sampled_from([0, MFLAG_STREAM]))
    inline_max = draw(st.sampled_from([INLINE_MAX, 0, 8]))
    chunk = draw(st.sampled_from([1, 5, 32, CHUNK]))
    units, _ = message_frames(sid, mtype, mflags, segs, ro, inline_max=inline_max, chunk=chunk)
    return units, msg_event(sid, mtype, mflags, segs, ro)


@st.composite
def frame_sequences(draw):
    """(frames, events): valid frames, DATA of different streams interleaved."""
    msg_sids = draw(st.lists(sids, max_size=6, unique=True))
    items = [draw(message_items(sid)) for sid in msg_sids]
    items += draw(st.lists(control_items(), max_size=4))
    queues = [list(units) for units, _ in items]
    rnd = draw(st.randoms(use_true_random=False))
    frames = []
    events = []
    live = [i for i in range(len(queues))]
    rnd.shuffle(live)
    while live:
        i = rnd.choice(live)
        frames.append(join([queues[i].pop(0)]))
        if not queues[i]:
            live.remove(i)
            events.append(items[i][1])
    return frames, events


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(frame_sequences(), st.integers(0, 2**32))
def test_property_valid_sequences_decode_identically(seq, seed):
    frames, events = seq
    data = b"".join(frames)
    res = assert_consistent(data, seed)
    assert res == ("ok", events)
    res = assert_consistent(data, seed, alloc=aligned, **FUZZ_LIMITS)
    assert res == ("ok", events)


@settings(max_examples=1000, deadline=None, database=None)
@given(st.binary(max_size=200), st.integers(0, 2**32))
def test_property_random_bytes(data, seed):
    assert_consistent(data, seed, **FUZZ_LIMITS)


@settings(max_examples=500, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(0, 3), sids, u64,
                          st.binary(max_size=24)), max_size=6),
       st.integers(0, 2**32))
def test_property_random_headers(frames, seed):
    """Random but header-shaped input: reaches deeper than random bytes."""
    data = b"".join(struct.pack("<BBHIQ", k, f, 0, s, ln) + body
                    for k, f, s, ln, body in frames)
    assert_consistent(data, seed, **FUZZ_LIMITS)
    data = b"".join(struct.pack("<BBHIQ", k % 8, f % 2, 0, s % 4, len(body)) + body
                    for k, f, s, ln, body in frames)
    assert_consistent(data, seed, **FUZZ_LIMITS)


LENGTH_VALUES = [0, 1, 7, 8, 2**31, 2**63 - 1, U64_MAX]


@st.composite
def mutation(draw, nframes):
    what = draw(st.sampled_from([
        "flip", "truncate", "length", "kind", "sid", "flags", "reserved",
        "duplicate", "drop", "swap", "insert", "segment", "nsegs",
    ]))
    i = draw(st.integers(0, max(nframes - 1, 0)))
    if what == "length":
        arg = draw(st.sampled_from(LENGTH_VALUES) | st.integers(0, 64) | u64)
    elif what == "kind":
        arg = draw(st.sampled_from([0, 8, 9, 127, 255]) | st.integers(1, KIND_MAX))
    elif what == "sid":
        arg = draw(st.sampled_from([0, 1, 2, 2**32 - 1]) | sids | st.just(None))
    elif what in ("flags", "reserved"):
        arg = draw(st.integers(0, 255))
    elif what == "segment":
        arg = (draw(st.integers(0, 4)), draw(st.sampled_from(LENGTH_VALUES) | u64))
    elif what == "nsegs":
        arg = draw(st.sampled_from([0, 1, 6, 17, 2**32 - 1]))
    elif what == "insert":
        arg = draw(st.binary(min_size=1, max_size=24))
    else:
        arg = draw(st.integers(0, 2**32))
    return what, i, arg


def apply_mutation(frames, m):
    what, i, arg = m
    frames = [bytearray(f) for f in frames]
    if not frames:
        frames = [bytearray()]
    i %= len(frames)
    f = frames[i]
    if what == "flip":
        data = bytearray(b"".join(frames))
        if data:
            bit = arg % (8 * len(data))
            data[bit // 8] ^= 1 << (bit % 8)
        return [data]
    if what == "truncate":
        data = b"".join(frames)
        return [bytearray(data[:arg % (len(data) + 1)])]
    if what == "duplicate":
        frames.insert(arg % (len(frames) + 1), bytearray(f))
    elif what == "drop":
        del frames[i]
    elif what == "swap":
        j = arg % len(frames)
        frames[i], frames[j] = frames[j], frames[i]
    elif what == "insert":
        frames.insert(i, bytearray(arg))
    elif len(f) >= HEADER_SIZE:
        if what == "length":
            f[8:16] = struct.pack("<Q", arg)
        elif what == "kind":
            f[0] = arg
        elif what == "flags":
            f[1] = arg
        elif what == "reserved":
            f[2] = arg
        elif what == "sid":
            if arg is None:  # the stream id of another frame
                arg = struct.unpack_from("<I", frames[(i + 1) % len(frames)], 4)[0] \
                    if len(frames[(i + 1) % len(frames)]) >= 8 else 0
            f[4:8] = struct.pack("<I", arg)
        elif what == "segment" and f[0] == KIND_MSG and len(f) >= HEADER_SIZE + 8:
            nsegs = struct.unpack_from("<I", f, 20)[0]
            k, ln = arg
            if nsegs and len(f) >= HEADER_SIZE + 8 + 8 * nsegs:
                struct.pack_into("<Q", f, 24 + 8 * (k % nsegs), ln)
        elif what == "nsegs" and f[0] == KIND_MSG and len(f) >= HEADER_SIZE + 8:
            struct.pack_into("<I", f, 20, arg)
    return frames


@settings(max_examples=1000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_property_mutated_sequences(data):
    frames, _ = data.draw(frame_sequences())
    n = data.draw(st.integers(1, 3))
    for _ in range(n):
        frames = apply_mutation(frames, data.draw(mutation(len(frames))))
    blob = bytes(b"".join(frames))
    seed = data.draw(st.integers(0, 2**32))
    assert_consistent(blob, seed, **FUZZ_LIMITS)
    assert_consistent(blob, seed, alloc=aligned, **FUZZ_LIMITS)


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_property_mutated_sequences_default_limits(data):
    """With the default limits too (the aligned allocator does not touch its pages)."""
    frames, _ = data.draw(frame_sequences())
    frames = apply_mutation(frames, data.draw(mutation(len(frames))))
    blob = bytes(b"".join(frames))
    for mode in ("whole", "bytewise"):
        dec = Decoder(alloc=aligned)
        try:
            if mode == "whole":
                dec.feed(blob)
            else:
                feed_bytewise(dec, blob)
        except WireError:
            pass
