"""vvu.protocol: payload layouts, the request table, header/message validation, describe()."""

from __future__ import annotations

import inspect
import os
import re
import struct
from collections.abc import Iterator
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st

import vvu.protocol as proto
from vvu.errors import ProtocolError
from vvu.protocol import (
    BACKEND_REQUESTS,
    EMPTY,
    MAX_CONFIG_DATA,
    MAX_PAYLOAD,
    REPLY_FLAGS,
    REQUESTS,
    SHMEM_SLOTS,
    U64,
    VERSION,
    VRING_NOFD,
    Answer,
    BackendRequest,
    ChannelName,
    Config,
    DeviceStateTransfer,
    DeviceStatus,
    Empty,
    FrontendRequest,
    Header,
    Inflight,
    Iotlb,
    IotlbPerm,
    IotlbType,
    Log,
    MemoryRegion,
    MemoryTable,
    Message,
    Payload,
    ProtocolFeature,
    RawPayload,
    RequestSpec,
    SharedObject,
    ShmemConfig,
    ShmemMap,
    SingleRegion,
    VhostFeature,
    VirtioFeature,
    VringAddr,
    VringArea,
    VringState,
    decode_header,
    decode_message,
    describe,
    encode,
    encode_ack,
    encode_message,
    encode_reply,
    feature_names,
    spec_for,
)

F = FrontendRequest
B = BackendRequest

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
regions = st.builds(MemoryRegion, u64, u64, u64, u64)

# One strategy per payload type; test_every_payload_type_has_a_strategy keeps this complete.
PAYLOADS: dict[type[Payload], st.SearchStrategy[Payload]] = {
    Empty: st.just(EMPTY),
    RawPayload: st.builds(RawPayload, st.binary(max_size=MAX_PAYLOAD)),
    U64: st.builds(U64, u64),
    VringState: st.builds(VringState, u32, u32),
    VringAddr: st.builds(VringAddr, u32, u32, u64, u64, u64, u64),
    MemoryRegion: regions,
    MemoryTable: st.builds(MemoryTable, st.lists(regions, max_size=8).map(tuple)),
    SingleRegion: st.builds(SingleRegion, regions),
    Log: st.builds(Log, u64, u64),
    Iotlb: st.builds(Iotlb, u64, u64, u64, u8, u8),
    Config: st.builds(Config, u32, u32, st.binary(max_size=MAX_CONFIG_DATA)),
    VringArea: st.builds(VringArea, u64, u64, u64),
    Inflight: st.builds(Inflight, u64, u64, u16, u16),
    SharedObject: st.builds(SharedObject, st.uuids()),
    DeviceStateTransfer: st.builds(DeviceStateTransfer, u32, u32),
    ShmemMap: st.builds(ShmemMap, u8, u64, u64, u64, u64),
    ShmemConfig: st.builds(ShmemConfig, u32, st.lists(u64, max_size=SHMEM_SLOTS).map(tuple)),
}


def _raw(request: int, flags: int, payload: bytes) -> tuple[Header, bytes]:
    """A header and payload as a transport hands them over, without any encoder checks."""
    return decode_header(Header(request, flags, len(payload)).pack()), payload


def _roundtrip(
    data: bytes,
    fds: tuple[int, ...] = (),
    *,
    channel: ChannelName = "frontend",
    is_reply: bool = False,
) -> Message:
    """Decode encoder output the way the engine will: header first, then the rest."""
    header = decode_header(data[:12], channel=channel)
    return decode_message(header, data[12:], fds, channel=channel, is_reply=is_reply)


def _fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def pipe_fds() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        if _fd_is_open(fd):
            os.close(fd)


# --- payload round trips ------------------------------------------------------------------------


def test_every_payload_type_has_a_strategy() -> None:
    exported = {
        obj
        for obj in vars(proto).values()
        if inspect.isclass(obj) and issubclass(obj, Payload) and not inspect.isabstract(obj)
    }
    assert exported == set(PAYLOADS)


@pytest.mark.parametrize("payload_type", list(PAYLOADS), ids=lambda t: t.__name__)
@given(data=st.data())
def test_payload_round_trips(payload_type: type[Payload], data: st.DataObject) -> None:
    payload = data.draw(PAYLOADS[payload_type])
    wire = payload.pack()
    assert payload_type.fits(len(wire))
    assert payload_type.unpack(wire) == payload


@given(st.sampled_from(sorted(REQUESTS)), st.data())
def test_every_request_round_trips_as_a_message(
    request: FrontendRequest, data: st.DataObject
) -> None:
    spec = REQUESTS[request]
    payload = data.draw(PAYLOADS[spec.payload])
    if spec.check is not None and spec.check(payload) is not None:
        return  # e.g. GET_CONFIG with size 0, covered by its own test
    fds = tuple(range(100, 100 + spec.fd_range(payload).low))
    need_reply = data.draw(st.booleans())
    wire = encode_message(request, payload, need_reply=need_reply, nfds=len(fds))
    message = _roundtrip(wire, fds)
    assert message == Message(request, VERSION | (0x8 if need_reply else 0), payload, fds)
    assert encode(message) == wire


@given(st.sampled_from(sorted(BACKEND_REQUESTS)), st.data())
def test_every_backend_request_round_trips(request: BackendRequest, data: st.DataObject) -> None:
    spec = BACKEND_REQUESTS[request]
    payload = data.draw(PAYLOADS[spec.payload])
    fds = tuple(range(100, 100 + spec.fd_range(payload).low))
    wire = encode_message(request, payload, nfds=len(fds))
    message = _roundtrip(wire, fds, channel="backend")
    assert message.request is request
    assert message.channel == "backend"
    assert message.payload == payload


@given(st.sampled_from(sorted(REQUESTS)), st.data())
def test_every_reply_round_trips(request: FrontendRequest, data: st.DataObject) -> None:
    spec = REQUESTS[request]
    reply_type = data.draw(st.sampled_from(spec.reply))
    payload = data.draw(PAYLOADS[reply_type])
    nfds = spec.reply_fd_range(payload).low
    wire = encode_reply(request, payload, nfds=nfds)
    message = _roundtrip(wire, tuple(range(nfds)), is_reply=True)
    assert message.request is request
    assert message.is_reply
    assert message.flags == REPLY_FLAGS
    # Alternatives are told apart by size, and an empty postcopy MemoryTable is 8 bytes like
    # the U64 ack listed before it: that one decodes as the ack.
    if reply_type is not U64 and U64 in spec.reply and len(wire) == 12 + 8:
        assert message.payload == U64.unpack(payload.pack())
        return
    assert message.payload == payload


# --- exact layouts (little-endian, hand-written) ------------------------------------------------


def test_header_layout() -> None:
    assert Header(5, 0x9, 72).pack() == bytes.fromhex("050000000900000048000000")
    assert Header.unpack(bytes.fromhex("0d0000000500000008000000")) == Header(13, 5, 8)


def test_vring_addr_wire_order_is_desc_used_avail_log() -> None:
    addr = VringAddr(
        index=3,
        flags=1,
        desc=0x0102030405060708,
        used=0x1112131415161718,
        avail=0x2122232425262728,
        log=0x3132333435363738,
    )
    wire = bytes.fromhex(
        "03000000"  # index
        "01000000"  # flags: VHOST_VRING_F_LOG
        "0807060504030201"  # desc
        "1817161514131211"  # used, before avail
        "2827262524232221"  # avail
        "3837363534333231"  # log
    )
    assert addr.pack() == wire
    assert VringAddr.unpack(wire) == addr


def test_memory_table_with_two_regions_layout() -> None:
    table = MemoryTable(
        (
            MemoryRegion(0x0, 0x40000000, 0x7F0000000000, 0x0),
            MemoryRegion(0x100000000, 0x1000, 0x7F0040000000, 0x40000000),
        )
    )
    wire = bytes.fromhex(
        "02000000"
        "00000000"  # nregions, padding
        "0000000000000000"
        "0000004000000000"
        "00000000007f0000"
        "0000000000000000"
        "0000000001000000"
        "0010000000000000"
        "00000040007f0000"
        "0000004000000000"
    )
    assert len(wire) == 8 + 2 * 32
    assert table.pack() == wire
    assert MemoryTable.unpack(wire) == table


def test_iotlb_is_32_bytes_with_tail_padding() -> None:
    msg = Iotlb(iova=0x1000, size=0x2000, uaddr=0x7F0000001000, perm=IotlbPerm.RW, type=2)
    wire = bytes.fromhex(
        "0010000000000000"  # iova
        "0020000000000000"  # size
        "00100000007f0000"  # uaddr
        "03"
        "02"  # perm RW, type UPDATE
        "000000000000"  # padding to 32
    )
    assert len(wire) == 32
    assert msg.pack() == wire
    assert Iotlb.unpack(wire) == msg
    assert Iotlb.unpack(wire).type == IotlbType.UPDATE


def test_inflight_is_24_bytes_and_20_is_accepted() -> None:
    inflight = Inflight(mmap_size=0x2000, mmap_offset=0x40, num_queues=2, queue_size=256)
    wire = bytes.fromhex("002000000000000040000000000000000200000100000000")
    assert len(wire) == 24
    assert inflight.pack() == wire
    assert Inflight.unpack(wire) == inflight
    assert Inflight.unpack(wire[:20]) == inflight  # the size in the spec's table
    with pytest.raises(
        ProtocolError, match=re.escape("Inflight payload must be 24 (or 20) bytes, got 22")
    ):
        Inflight.unpack(wire[:22])


def test_other_layouts() -> None:
    assert SingleRegion(MemoryRegion(1, 2, 3, 4)).pack() == bytes(8) + struct.pack(
        "<4Q", 1, 2, 3, 4
    )
    assert Log(0x1000, 0x10).pack() == bytes.fromhex("00100000000000001000000000000000")
    assert Config(0x10, 1, b"\xaa\xbb").pack() == bytes.fromhex("100000000200000001000000aabb")
    assert VringArea(0x101, 0x1000, 0).pack() == struct.pack("<3Q", 0x101, 0x1000, 0)
    assert DeviceStateTransfer(1, 0).pack() == bytes.fromhex("0100000000000000")
    assert ShmemMap(7, 1, 2, 3, 1).pack() == bytes.fromhex("0700000000000000") + struct.pack(
        "<4Q", 1, 2, 3, 1
    )
    assert len(ShmemConfig(1, (0x1000,)).pack()) == 2056
    # The UUID's first three fields are big-endian: RFC 4122 byte order, as uuid.bytes has it.
    uuid = UUID("00112233-4455-6677-8899-aabbccddeeff")
    assert SharedObject(uuid).pack() == bytes.fromhex("00112233445566778899aabbccddeeff")


# --- header validation --------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x6])
def test_bad_version_is_a_protocol_error_naming_the_request(flags: int) -> None:
    with pytest.raises(ProtocolError, match="SET_OWNER: unsupported version"):
        decode_header(Header(F.SET_OWNER, flags, 0).pack())


def test_bad_version_of_an_unknown_request_is_still_an_error() -> None:
    with pytest.raises(ProtocolError, match="unknown frontend request 999: unsupported version"):
        decode_header(Header(999, 0x2, 0).pack())


@pytest.mark.parametrize("flags", [0x11, 0x1 | 0x80000000, 0x1 | 0x100])
def test_unknown_flag_bits_are_rejected(flags: int) -> None:
    with pytest.raises(ProtocolError, match="GET_FEATURES: unknown flag bits"):
        decode_header(Header(F.GET_FEATURES, flags, 0).pack())


def test_size_over_4096_is_rejected() -> None:
    decode_header(Header(F.SET_CONFIG, VERSION, MAX_PAYLOAD).pack())
    with pytest.raises(ProtocolError, match="SET_CONFIG: payload size 4097 exceeds"):
        decode_header(Header(F.SET_CONFIG, VERSION, MAX_PAYLOAD + 1).pack())


def test_header_must_be_12_bytes() -> None:
    with pytest.raises(ProtocolError, match="12 bytes, got 11"):
        decode_header(bytes(11))


def test_backend_channel_names_backend_requests() -> None:
    with pytest.raises(ProtocolError, match="BACKEND_VRING_CALL: unsupported version"):
        decode_header(Header(B.BACKEND_VRING_CALL, 0, 8).pack(), channel="backend")


def test_decode_message_revalidates_the_header() -> None:
    # A header built from a transport's fields, not from decode_header.
    with pytest.raises(ProtocolError, match="unsupported version"):
        decode_message(Header(F.SET_OWNER, 0, 0), b"")


# --- payload validation -------------------------------------------------------------------------


def test_payload_must_match_the_header_size() -> None:
    with pytest.raises(ProtocolError, match="SET_FEATURES: header says 8 payload bytes, got 4"):
        decode_message(Header(F.SET_FEATURES, VERSION, 8), bytes(4))


@pytest.mark.parametrize("size", [0, 8, 32, 48])
def test_payload_too_short_or_too_long(size: int) -> None:
    header, payload = _raw(F.SET_VRING_ADDR, VERSION, bytes(size))
    with pytest.raises(
        ProtocolError, match=f"SET_VRING_ADDR: VringAddr payload must be 40 bytes, got {size}"
    ):
        decode_message(header, payload)


def test_empty_request_with_a_payload_is_rejected() -> None:
    header, payload = _raw(F.GET_FEATURES, VERSION, bytes(8))
    with pytest.raises(ProtocolError, match="GET_FEATURES: Empty payload must be 0 bytes, got 8"):
        decode_message(header, payload)


def test_set_log_base_is_16_bytes_not_8() -> None:
    header, payload = _raw(F.SET_LOG_BASE, VERSION, bytes(8))
    with pytest.raises(ProtocolError, match="Log payload must be 16 bytes"):
        decode_message(header, payload)


def test_nregions_must_match_the_size() -> None:
    one_region = MemoryTable((MemoryRegion(0, 0x1000, 0x7F00, 0),)).pack()
    lying = struct.pack("<II", 2, 0) + one_region[8:]
    header, payload = _raw(F.SET_MEM_TABLE, VERSION, lying)
    with pytest.raises(
        ProtocolError, match="SET_MEM_TABLE: MemoryTable says nregions=2, which needs 72 bytes"
    ):
        decode_message(header, payload, (3,))
    with pytest.raises(ProtocolError, match="payload must be 8 \\+ 32\\*n bytes"):
        MemoryTable.unpack(bytes(4))


def test_too_many_regions() -> None:
    region = MemoryRegion(0, 0x1000, 0, 0).pack()
    nine = struct.pack("<II", 9, 0) + region * 9
    header, payload = _raw(F.SET_MEM_TABLE, VERSION, nine)
    with pytest.raises(ProtocolError, match="MemoryTable has 9 regions, at most 8"):
        decode_message(header, payload, tuple(range(9)))
    with pytest.raises(ValueError, match="9 regions, at most 8"):
        MemoryTable((MemoryRegion(0, 0, 0, 0),) * 9).pack()


def test_get_config_with_size_zero_is_an_error() -> None:
    header, payload = _raw(F.GET_CONFIG, VERSION, Config(0, 0, b"").pack())
    with pytest.raises(ProtocolError, match="GET_CONFIG: size 0"):
        decode_message(header, payload)
    # SET_CONFIG of nothing is odd but harmless, and a GET_CONFIG reply of size 0 reports failure.
    decode_message(*_raw(F.SET_CONFIG, VERSION, Config(0, 0, b"").pack()))
    decode_message(*_raw(F.GET_CONFIG, REPLY_FLAGS, Config(0, 0, b"").pack()), is_reply=True)


def test_config_size_must_match_its_data() -> None:
    wire = struct.pack("<III", 0, 4, 0) + bytes(3)
    with pytest.raises(ProtocolError, match="Config says size=4 but carries 3 data bytes"):
        decode_message(*_raw(F.SET_CONFIG, VERSION, wire))
    with pytest.raises(ProtocolError, match="Config payload must be 12 \\+ size bytes"):
        Config.unpack(bytes(11))
    with pytest.raises(ValueError, match="at most 4084"):
        Config(0, 0, bytes(MAX_CONFIG_DATA + 1)).pack()


# --- fd counts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", [F.SET_VRING_KICK, F.SET_VRING_CALL, F.SET_VRING_ERR])
def test_vring_fd_requests_need_an_fd_unless_nofd(request_id: FrontendRequest) -> None:
    with_fd = U64.vring(1).pack()
    without = U64.vring(1, nofd=True).pack()
    assert decode_message(*_raw(request_id, VERSION, with_fd), (5,)).payload == U64(1)
    assert decode_message(*_raw(request_id, VERSION, without)).payload == U64(1 | VRING_NOFD)
    with pytest.raises(
        ProtocolError, match=re.escape("0 fds attached, expected 1 (the NOFD bit is clear)")
    ):
        decode_message(*_raw(request_id, VERSION, with_fd))
    with pytest.raises(
        ProtocolError, match=re.escape("1 fds attached, expected 0 (the NOFD bit is set)")
    ):
        decode_message(*_raw(request_id, VERSION, without), (5,))


def test_set_mem_table_needs_one_fd_per_region() -> None:
    table = MemoryTable((MemoryRegion(0, 0x1000, 0, 0), MemoryRegion(0x1000, 0x1000, 0, 0)))
    header, payload = _raw(F.SET_MEM_TABLE, VERSION, table.pack())
    assert decode_message(header, payload, (3, 4)).payload == table
    for fds in [(), (3,), (3, 4, 5)]:
        with pytest.raises(
            ProtocolError,
            match=f"SET_MEM_TABLE: {len(fds)} fds attached, expected 2 .one per region",
        ):
            decode_message(header, payload, fds)


@pytest.mark.parametrize(
    ("request_id", "payload", "allowed"),
    [
        (F.ADD_MEM_REG, SingleRegion(MemoryRegion(0, 1, 2, 0)), {1}),
        (F.REM_MEM_REG, SingleRegion(MemoryRegion(0, 1, 2, 0)), {0, 1}),
        (F.SET_LOG_BASE, Log(0x1000, 0), {0, 1}),
        (F.SET_LOG_FD, EMPTY, {1}),
        (F.SET_BACKEND_REQ_FD, EMPTY, {1}),
        (F.SET_INFLIGHT_FD, Inflight(0x1000, 0, 1, 256), {1}),
        (F.SET_DEVICE_STATE_FD, DeviceStateTransfer(0, 0), {1}),
        (F.SET_FEATURES, U64(0), {0}),
        (F.GET_VRING_BASE, VringState(0, 0), {0}),
    ],
)
def test_fd_counts(request_id: FrontendRequest, payload: Payload, allowed: set[int]) -> None:
    header, wire = _raw(request_id, VERSION, payload.pack())
    for count in range(3):
        fds = tuple(range(10, 10 + count))
        if count in allowed:
            assert decode_message(header, wire, fds).fds == fds
        else:
            with pytest.raises(ProtocolError, match=f"{request_id.name}: {count} fds attached"):
                decode_message(header, wire, fds)


def test_reply_fd_counts() -> None:
    got = Inflight(0x2000, 0, 2, 256).pack()
    none = Inflight(0, 0, 2, 256).pack()
    decode_message(*_raw(F.GET_INFLIGHT_FD, REPLY_FLAGS, got), (7,), is_reply=True)
    decode_message(*_raw(F.GET_INFLIGHT_FD, REPLY_FLAGS, none), (), is_reply=True)
    with pytest.raises(ProtocolError, match="GET_INFLIGHT_FD reply: 0 fds attached, expected 1"):
        decode_message(*_raw(F.GET_INFLIGHT_FD, REPLY_FLAGS, got), (), is_reply=True)

    state = F.SET_DEVICE_STATE_FD
    decode_message(*_raw(state, REPLY_FLAGS, U64(0).pack()), (7,), is_reply=True)
    decode_message(*_raw(state, REPLY_FLAGS, U64(0x100).pack()), (), is_reply=True)
    decode_message(*_raw(state, REPLY_FLAGS, U64(0x101).pack()), (), is_reply=True)
    with pytest.raises(ProtocolError, match=re.escape("expected 0 (bit 8 (no fd) is set)")):
        decode_message(*_raw(state, REPLY_FLAGS, U64(0x100).pack()), (7,), is_reply=True)
    with pytest.raises(ProtocolError, match=re.escape("expected 1 (bit 8 (no fd) is clear)")):
        decode_message(*_raw(state, REPLY_FLAGS, U64(0).pack()), (), is_reply=True)


def test_host_notifier_fd_follows_nofd() -> None:
    msg = B.BACKEND_VRING_HOST_NOTIFIER_MSG
    mapped = VringArea(2, 0x1000, 0).pack()
    unmapped = VringArea(2 | VRING_NOFD, 0x1000, 0).pack()
    decode_message(*_raw(msg, VERSION, mapped), (9,), channel="backend")
    decode_message(*_raw(msg, VERSION, unmapped), (), channel="backend")
    with pytest.raises(ProtocolError, match="BACKEND_VRING_HOST_NOTIFIER_MSG: 0 fds attached"):
        decode_message(*_raw(msg, VERSION, mapped), (), channel="backend")


def test_decode_never_closes_fds(pipe_fds: tuple[int, int]) -> None:
    header, payload = _raw(F.SET_VRING_CALL, VERSION, U64.vring(0, nofd=True).pack())
    with pytest.raises(ProtocolError):
        decode_message(header, payload, pipe_fds)
    assert all(_fd_is_open(fd) for fd in pipe_fds)
    unknown = decode_message(*_raw(77, VERSION, b""), pipe_fds)
    assert unknown.fds == pipe_fds
    assert all(_fd_is_open(fd) for fd in pipe_fds)


# --- replies ------------------------------------------------------------------------------------


def test_reply_flags_are_exactly_0x5() -> None:
    reply = encode_reply(F.GET_FEATURES, U64(1 << 32))
    assert reply[:12] == bytes.fromhex("010000000500000008000000")
    ack = encode_ack(F.SET_MEM_TABLE, ok=False)
    assert ack == bytes.fromhex("0500000005000000080000000100000000000000")
    assert encode_ack(F.SET_MEM_TABLE, ok=True)[12:] == bytes(8)
    # The reply to a request that asked NEED_REPLY still carries 0x5: nothing is echoed.
    request = _roundtrip(encode_message(F.SET_FEATURES, U64(0), need_reply=True))
    assert request.flags == 0x9
    assert encode_ack(request.request, ok=True)[4:8] == struct.pack("<I", 0x5)


@pytest.mark.parametrize("flags", [0x1, 0x4 | 0x8 | 0x1, 0x4 | 0x1 | 0x8])
def test_reply_with_other_flags_is_rejected(flags: int) -> None:
    header, payload = _raw(F.GET_FEATURES, flags, U64(0).pack())
    with pytest.raises(ProtocolError, match="GET_FEATURES reply: reply flags must be exactly 0x5"):
        decode_message(header, payload, is_reply=True)


def test_request_with_the_reply_flag_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="SET_OWNER: REPLY flag set on a request"):
        decode_message(*_raw(F.SET_OWNER, REPLY_FLAGS, b""))


def test_encoding_a_reply_with_need_reply_is_refused() -> None:
    with pytest.raises(ValueError, match="exactly 0x5"):
        encode(Message(F.GET_FEATURES, 0x5 | 0x8, U64(0)))


def test_reply_alternatives_are_chosen_by_size() -> None:
    log = Log(0x1000, 0)
    for payload in (log, EMPTY, U64(0)):
        message = decode_message(*_raw(F.SET_LOG_BASE, REPLY_FLAGS, payload.pack()), is_reply=True)
        assert message.payload == payload
    with pytest.raises(ProtocolError, match="SET_LOG_BASE reply: payload of 10 bytes is none of"):
        decode_message(*_raw(F.SET_LOG_BASE, REPLY_FLAGS, bytes(10)), is_reply=True)


def test_ack_for_a_typed_reply_is_refused() -> None:
    with pytest.raises(ValueError, match="GET_VRING_BASE is answered with VringState, not an ack"):
        encode_ack(F.GET_VRING_BASE, ok=False)


def test_ack_for_an_unknown_request() -> None:
    ack = encode_ack(200, ok=False)
    assert ack[:12] == Header(200, REPLY_FLAGS, 8).pack()
    reply = _roundtrip(ack, is_reply=True)
    assert not reply.known
    assert reply.payload == RawPayload(struct.pack("<Q", 1))


# --- unknown requests ---------------------------------------------------------------------------


def test_unknown_request_decodes_to_a_raw_message() -> None:
    message = decode_message(*_raw(200, VERSION | 0x8, b"\xab\xcd"), (4,))
    assert not message.known
    assert message.request == 200
    assert message.payload == RawPayload(b"\xab\xcd")
    assert message.fds == (4,)
    assert message.need_reply
    assert message.spec is None
    # Backend ids beyond the table are unknown on the backend channel only.
    assert decode_message(*_raw(11, VERSION, b""), channel="backend").known is False


def test_id_known_on_one_channel_only() -> None:
    # 45 is a front-end request; on the backend channel it is unknown and passes through raw.
    message = decode_message(*_raw(45, VERSION, bytes(3)), channel="backend")
    assert not message.known
    assert message.name == "unknown backend request 45"


# --- encoding checks ----------------------------------------------------------------------------


def test_encode_checks_payload_type_and_fds() -> None:
    with pytest.raises(TypeError, match="SET_VRING_ADDR: payload must be VringAddr, not U64"):
        encode_message(F.SET_VRING_ADDR, U64(0))
    with pytest.raises(ValueError, match="SET_VRING_CALL: 0 fds attached, expected 1"):
        encode_message(F.SET_VRING_CALL, U64.vring(0))
    with pytest.raises(ValueError, match="GET_CONFIG: size 0"):
        encode_message(F.GET_CONFIG, Config(0, 0, b""))
    with pytest.raises(TypeError, match="GET_FEATURES reply: payload must be U64, not Empty"):
        encode_reply(F.GET_FEATURES, EMPTY)
    with pytest.raises(ValueError, match="does not fit"):
        VringState(2**32, 0).pack()
    with pytest.raises(ValueError, match="vring index 256"):
        U64.vring(256)


def test_plain_ids_and_channels() -> None:
    assert Message(5, VERSION, EMPTY).request is F.SET_MEM_TABLE
    assert Message(B.BACKEND_SHMEM_MAP, VERSION, EMPTY).channel == "backend"
    assert spec_for(4, "backend") is BACKEND_REQUESTS[B.BACKEND_VRING_CALL]
    assert encode_reply(2, U64(0), channel="backend") == encode_reply(
        B.BACKEND_CONFIG_CHANGE_MSG, U64(0)
    )
    with pytest.raises(ValueError, match="SET_OWNER is a frontend request"):
        spec_for(F.SET_OWNER, "backend")


# --- the table ----------------------------------------------------------------------------------


def test_table_covers_every_request() -> None:
    assert set(REQUESTS) == set(FrontendRequest)
    assert set(BACKEND_REQUESTS) == set(BackendRequest)
    assert [r.value for r in FrontendRequest] == list(range(1, 46))
    assert [r.value for r in BackendRequest] == list(range(1, 11))


@pytest.mark.parametrize(
    "spec",
    [*REQUESTS.values(), *BACKEND_REQUESTS.values()],
)
def test_rows_are_well_formed(spec: RequestSpec[Payload]) -> None:
    assert issubclass(spec.payload, Payload)
    assert spec.reply
    assert all(issubclass(t, Payload) for t in spec.reply)
    # Alternatives must be told apart by size: no two accept the same size, except the
    # documented 8-byte overlap of a U64 ack with an empty postcopy MemoryTable.
    for size in range(0, 64):
        fitting = [t for t in spec.reply if t.fits(size)]
        assert len(fitting) <= 1 or (size == 8 and fitting[0] is U64)


def test_answer_follows_reply_kind_and_negotiation() -> None:
    reply_ack = ProtocolFeature.REPLY_ACK.mask
    log_shmfd = ProtocolFeature.LOG_SHMFD.mask
    set_features = REQUESTS[F.SET_FEATURES]
    assert set_features.answer(need_reply=True, protocol_features=reply_ack) is Answer.ACK
    assert set_features.answer(need_reply=True, protocol_features=0) is Answer.NOTHING
    assert set_features.answer(need_reply=False, protocol_features=reply_ack) is Answer.NOTHING
    get_features = REQUESTS[F.GET_FEATURES]
    assert get_features.answer(need_reply=True, protocol_features=reply_ack) is Answer.REPLY
    assert get_features.answer(need_reply=False, protocol_features=0) is Answer.REPLY
    assert REQUESTS[F.IOTLB_MSG].answer(need_reply=True, protocol_features=0) is Answer.REPLY
    log_base = REQUESTS[F.SET_LOG_BASE]
    assert log_base.answer(need_reply=False, protocol_features=log_shmfd) is Answer.REPLY
    assert log_base.answer(need_reply=True, protocol_features=reply_ack) is Answer.ACK
    assert log_base.answer(need_reply=False, protocol_features=0) is Answer.NOTHING


def test_feature_gates() -> None:
    assert REQUESTS[F.GET_QUEUE_NUM].feature is ProtocolFeature.MQ
    assert REQUESTS[F.VRING_KICK].feature is ProtocolFeature.INBAND_NOTIFICATIONS
    assert REQUESTS[F.ADD_MEM_REG].feature is ProtocolFeature.CONFIGURE_MEM_SLOTS
    assert REQUESTS[F.GET_FEATURES].feature is None
    assert BACKEND_REQUESTS[B.BACKEND_SHMEM_MAP].feature is ProtocolFeature.SHMEM


# --- feature bits -------------------------------------------------------------------------------


def test_feature_bit_numbers() -> None:
    assert ProtocolFeature.REPLY_ACK.value == 3
    assert ProtocolFeature.BACKEND_REQ.value == 5
    assert ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN.value == 23
    assert [f.value for f in ProtocolFeature] == list(range(24))
    assert VirtioFeature.INDIRECT_DESC.value == 28
    assert VirtioFeature.EVENT_IDX.value == 29
    assert VirtioFeature.VERSION_1.value == 32
    assert VirtioFeature.ACCESS_PLATFORM.value == 33
    assert VirtioFeature.RING_PACKED.value == 34
    assert VirtioFeature.IN_ORDER.value == 35
    assert VhostFeature.PROTOCOL_FEATURES.value == 30
    assert VhostFeature.LOG_ALL.value == 26
    assert VhostFeature.PROTOCOL_FEATURES.mask == 0x40000000


def test_feature_masks_to_names_and_back() -> None:
    mask = ProtocolFeature.to_mask(["MQ", ProtocolFeature.REPLY_ACK, "CONFIG"])
    assert mask == 0x209
    assert ProtocolFeature.from_mask(mask) == [
        ProtocolFeature.MQ,
        ProtocolFeature.REPLY_ACK,
        ProtocolFeature.CONFIG,
    ]
    assert ProtocolFeature.names(mask | 1 << 40) == ["MQ", "REPLY_ACK", "CONFIG", "bit40"]
    assert feature_names(1 << 32 | 1 << 30 | 1 << 5) == ["bit5", "PROTOCOL_FEATURES", "VERSION_1"]
    with pytest.raises(KeyError):
        ProtocolFeature.to_mask(["NO_SUCH_FEATURE"])


@given(u64)
def test_protocol_mask_round_trips_through_members(mask: int) -> None:
    known = mask & ((1 << 24) - 1)
    assert ProtocolFeature.to_mask(ProtocolFeature.from_mask(mask)) == known
    assert ProtocolFeature.to_mask(f.name for f in ProtocolFeature.from_mask(mask)) == known


# --- describe -----------------------------------------------------------------------------------


def _msg(request: int, payload: Payload, *, flags: int = VERSION, nfds: int = 0) -> Message:
    return Message(request, flags, payload, tuple(range(nfds)))


def test_describe() -> None:
    assert (
        describe(_msg(F.SET_VRING_ADDR, VringAddr(0, 0, 0x1000, 0x2000, 0x3000, 0)))
        == "SET_VRING_ADDR index=0 flags=0x0 desc=0x1000 used=0x2000 avail=0x3000 log=0x0 fds=0"
    )
    assert describe(_msg(F.SET_VRING_CALL, U64(1), nfds=1)) == "SET_VRING_CALL index=1 fds=1"
    assert (
        describe(_msg(F.SET_VRING_KICK, U64(2 | VRING_NOFD))) == "SET_VRING_KICK index=2 nofd fds=0"
    )
    features = 1 << 32 | 1 << 30 | 1 << 29 | 1 << 5
    assert describe(_msg(F.GET_FEATURES, U64(features), flags=REPLY_FLAGS)) == (
        "GET_FEATURES reply features=0x160000020 (bit5|EVENT_IDX|PROTOCOL_FEATURES|VERSION_1) fds=0"
    )
    assert describe(_msg(F.SET_PROTOCOL_FEATURES, U64(0x209), flags=0x9)) == (
        "SET_PROTOCOL_FEATURES need_reply protocol_features=0x209 (MQ|REPLY_ACK|CONFIG) fds=0"
    )
    assert describe(_msg(F.SET_FEATURES, U64(0), flags=REPLY_FLAGS)) == (
        "SET_FEATURES reply result=ok fds=0"
    )
    assert describe(_msg(F.SET_STATUS, U64(int(DeviceStatus.FEATURES_OK) | 0x7))) == (
        "SET_STATUS status=0xf (ACKNOWLEDGE|DRIVER|DRIVER_OK|FEATURES_OK) fds=0"
    )
    mac = int.from_bytes(bytes.fromhex("525400123456") + bytes(2), "little")
    assert describe(_msg(F.SEND_RARP, U64(mac))) == "SEND_RARP mac=52:54:00:12:34:56 fds=0"
    table = MemoryTable((MemoryRegion(0, 0x40000000, 0x7F0000000000, 0),))
    assert describe(_msg(F.SET_MEM_TABLE, table, flags=0x9, nfds=1)) == (
        "SET_MEM_TABLE need_reply nregions=1 [guest_phys_addr=0x0 memory_size=0x40000000 "
        "userspace_addr=0x7f0000000000 mmap_offset=0x0] fds=1"
    )
    assert describe(_msg(F.SET_OWNER, EMPTY)) == "SET_OWNER fds=0"
    assert describe(_msg(200, RawPayload(b"\xab\xcd"), flags=0x9, nfds=1)) == (
        "unknown frontend request 200 need_reply size=2 data=abcd fds=1"
    )
    area = Message(B.BACKEND_VRING_HOST_NOTIFIER_MSG, VERSION, VringArea(0x101, 0x1000, 0))
    assert describe(area) == (
        "BACKEND_VRING_HOST_NOTIFIER_MSG index=1 nofd size=0x1000 offset=0x0 fds=0"
    )
    iotlb = Iotlb(0x1000, 0x2000, 0x7F00, IotlbPerm.RW, IotlbType.UPDATE)
    assert describe(_msg(F.IOTLB_MSG, iotlb)) == (
        "IOTLB_MSG iova=0x1000 size=0x2000 uaddr=0x7f00 perm=RW type=UPDATE fds=0"
    )
