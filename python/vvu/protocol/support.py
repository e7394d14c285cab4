"""What vvu supports of the vhost-user protocol, per request and protocol feature: the one source
of `docs/protocol-support.md`.

Each row says whether it works over AF_UNIX (`vvu serve`) and through the virtio-vhost-user
device (`vvu serve --vvu`), and which tests prove it. `tests/test_protocol_support.py` fails
when the doc differs from `render()`, when a request or feature has no row, when a named test
does not exist, or when a row contradicts what the engine offers and the device lets through.
Updating a row is a one-line change here, then regenerate:

    .venv/bin/python -m vvu.protocol.support > docs/protocol-support.md
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

from vvu.protocol.constants import BackendRequest, FrontendRequest, ProtocolFeature

__all__ = ["BACKEND_ROWS", "FEATURE_ROWS", "FRONTEND_ROWS", "Row", "Status", "render"]


class Status(enum.Enum):
    YES = "yes"
    REFUSED = "refused"
    NOT_OFFERED = "not offered"
    FILTERED = "filtered"


_MEANINGS: Final = {
    Status.YES: "implemented, offered and tested",
    Status.REFUSED: (
        "its protocol feature is never offered; answered with a failure (failure ack, or the "
        "failure form of its reply) and a log line saying why, or, for a request that has no "
        "failure form or comes without the fd it needs, the connection is closed (see its note)"
    ),
    Status.NOT_OFFERED: (
        "the engine does not offer the feature / never sends the request; our front-end "
        "refuses such back-end requests with a failure ack"
    ),
    Status.FILTERED: (
        "the VVU device clears the feature from GET_PROTOCOL_FEATURES: its fds cannot cross "
        "the device yet"
    ),
}


@dataclass(frozen=True, slots=True)
class Row:
    unix: Status
    vvu: Status
    tests: tuple[str, ...] = ()
    note: str = ""


_Member = TypeVar("_Member", bound=enum.IntEnum)

_Y, _R, _N, _X = (
    Status.YES,
    Status.REFUSED,
    Status.NOT_OFFERED,
    Status.FILTERED,
)

# Test node ids (file::function; parametrised tests run every case).
_E = "tests/test_engine.py::"
_QEMU_ORDER = _E + "test_qemu_order"  # QEMU's handshake, both transports
_GUEST_VVU = "tests/test_qemu_peers.py::test_blk_guest_through_the_vvu_device"
_GROW = "tests/test_qemu_peers.py::test_blk_guest_sees_the_disk_grow_when_the_daemon_gets_sighup"
_INBAND = _E + "test_blk_and_rng_data_with_inband_notifications"
_INBAND_NET = "tests/test_net.py::test_two_front_ends_exchange_frames_with_inband_notifications"
_INBAND_RAW = _E + "test_inband_vring_kick_starts_a_ring_and_calls_arrive_as_messages"
_REPLY_ACK = _E + "test_reply_ack_is_one_u64_with_flags_0x5_and_the_request_id"
_INBAND_NEEDS = (
    _E + "test_inband_without_reply_ack_and_backend_req_closes_and_vring_kick_needs_inband"
)
_REFUSED = _E + "test_refused_requests_get_their_failure_answer_and_a_reason"
_STATE = "tests/test_device_state.py::test_blk_state_moves_between_two_backend_processes"
_STATE_RETURNED_FD = "tests/test_device_state.py::test_our_frontend_uses_the_fd_a_backend_returns"
_STATE_BAD = _E + "test_set_device_state_fd_refuses_bad_transfers_with_an_error_code"
_STATE_VVU = _E + "test_device_state_is_not_offered_through_the_vvu_device"
_MEM_SLOTS = _E + "test_add_and_remove_memory_regions"
_STATUS = _E + "test_status_config_and_queue_num"
_NET = "tests/test_net.py::test_engine_routes_net_set_mtu_and_send_rarp"
_CONFIG_CHANGE = _E + "test_config_change_is_announced_on_the_backend_channel"
_RESET_STATUS = _E + "test_set_status_0_resets_the_device_and_get_vring_base_still_answers"
_NEEDS_RESET = _E + "test_a_broken_ring_sets_needs_reset_until_the_driver_resets"
_SUSPENDED = _E + "test_a_suspended_device_sends_nothing_until_a_ring_starts"
_DISABLED_TX = "tests/test_net.py::test_a_disabled_transmit_queue_discards_what_it_is_given"
_INFLIGHT = "tests/test_inflight.py::"
_INFLIGHT_KILLS = _INFLIGHT + "test_serve_blk_killed_20_times_loses_and_repeats_nothing"
_INFLIGHT_QEMU = _INFLIGHT + "test_qemu_guest_write_stream_survives_serve_blk_sigkilled"
_INFLIGHT_VVU = (
    "tests/test_vvu_device.py::test_get_inflight_fd_reply_carries_a_device_region_that_is_shmid_3"
)
_INFLIGHT_FILE = (
    "tests/test_vvu_device.py::test_frontend_memory_inflight_regions_are_the_devices_memfd_in_bar3"
)
_IOMMU = "tests/test_iommu.py::"
_IOMMU_IO = _IOMMU + "test_blk_io_goes_through_translations_the_backend_asks_for"
_IOMMU_QEMU = (
    "tests/test_qemu_peers.py::test_blk_guest_behind_a_viommu_does_checksummed_io_through_the_iotlb"
)
_IOMMU_QEMU_VVU = "tests/test_qemu_peers.py::test_blk_guest_behind_a_viommu_through_the_vvu_device"
_LOG = "tests/test_dirty_log.py::"
_LOG_FRONTEND = _LOG + "test_blk_worker_logs_exactly_the_pages_it_writes"
_LOG_BASE = _LOG + "test_set_log_base_replies_with_the_log_and_refuses_a_log_beyond_its_fd"
_LOG_VVU = _LOG + "test_vvu_device_offers_dirty_logging"
_LOG_DOORBELL = _LOG + "test_vvu_log_doorbell_signals_the_frontends_log_eventfd"
_LOG_PACKED = _LOG + "test_packed_ring_logs_each_used_descriptor_in_its_own_slots_page"
_MIGRATION = (
    "tests/test_qemu_peers.py::"
    "test_blk_guest_live_migrates_while_writing_and_its_data_verifies_on_the_destination"
)
_LOG_NOTE = "split and packed rings; over VVU the log is the device's shmid 2"
_FRONTEND_REFUSES = (
    _E + "test_our_frontend_answers_back_end_requests_it_does_not_support_with_a_failure_ack"
)

_F = FrontendRequest
FRONTEND_ROWS: Final[dict[FrontendRequest, Row]] = {
    _F.GET_FEATURES: Row(_Y, _Y, (_QEMU_ORDER, _GUEST_VVU)),
    _F.SET_FEATURES: Row(_Y, _Y, (_QEMU_ORDER, _E + "test_unoffered_feature_bits_are_refused")),
    _F.SET_OWNER: Row(_Y, _Y, (_QEMU_ORDER,)),
    _F.RESET_OWNER: Row(
        _Y,
        _Y,
        (_REPLY_ACK,),
        "deprecated: stops the rings, keeps the session",
    ),
    _F.SET_MEM_TABLE: Row(
        _Y, _Y, (_QEMU_ORDER, _E + "test_set_mem_table_while_running_reattaches_the_rings")
    ),
    _F.SET_LOG_BASE: Row(
        _Y, _Y, (_LOG_BASE, _LOG_FRONTEND, _LOG_PACKED, _MIGRATION, _LOG_VVU), _LOG_NOTE
    ),
    _F.SET_LOG_FD: Row(
        _Y,
        _Y,
        (_LOG_BASE, _LOG_DOORBELL),
        "the eventfd is kept, never signalled (QEMU does not use it); over VVU the device's "
        "log doorbell (aux notification 2N)",
    ),
    _F.SET_VRING_NUM: Row(_Y, _Y, (_QEMU_ORDER,)),
    _F.SET_VRING_ADDR: Row(_Y, _Y, (_QEMU_ORDER,)),
    _F.SET_VRING_BASE: Row(
        _Y, _Y, (_E + "test_get_vring_base_stops_after_in_flight_requests_and_the_ring_resumes",)
    ),
    _F.GET_VRING_BASE: Row(
        _Y, _Y, (_E + "test_get_vring_base_stops_after_in_flight_requests_and_the_ring_resumes",)
    ),
    _F.SET_VRING_KICK: Row(
        _Y, _Y, (_QEMU_ORDER, _E + "test_blk_native_worker_polls_a_ring_without_kick_fd")
    ),
    _F.SET_VRING_CALL: Row(
        _Y, _Y, (_E + "test_call_fd_replaced_while_running_loses_no_completion",)
    ),
    _F.SET_VRING_ERR: Row(
        _Y, _Y, (_E + "test_broken_ring_signals_the_current_err_fd_and_the_session_goes_on",)
    ),
    _F.GET_PROTOCOL_FEATURES: Row(_Y, _Y, (_QEMU_ORDER,), "the device filters the answer"),
    _F.SET_PROTOCOL_FEATURES: Row(
        _Y, _Y, (_E + "test_protocol_features_apply_before_set_features",)
    ),
    _F.GET_QUEUE_NUM: Row(_Y, _Y, (_STATUS,)),
    _F.SET_VRING_ENABLE: Row(
        _Y,
        _Y,
        (_E + "test_with_protocol_features_rings_wait_for_enable", _DISABLED_TX),
        "started but disabled: net transmit queues discard what they are given; blk, rng and "
        'net receive queues are left alone until enabled (see "Ring states" below)',
    ),
    _F.SEND_RARP: Row(_Y, _Y, (_NET,), "net only"),
    _F.NET_SET_MTU: Row(_Y, _Y, (_NET,), "net only"),
    _F.SET_BACKEND_REQ_FD: Row(
        _Y, _Y, (_CONFIG_CHANGE, "tests/test_vvu_transport.py::test_backend_channel_relay")
    ),
    _F.IOTLB_MSG: Row(
        _Y,
        _Y,
        (
            _IOMMU_IO,
            _IOMMU + "test_bad_iotlb_messages_are_refused_and_the_session_goes_on",
            _IOMMU + "test_invalidations_racing_with_io_lose_nothing",
            _IOMMU_QEMU,
            _IOMMU_QEMU_VVU,
        ),
        "blk (native workers); update and invalidate",
    ),
    _F.SET_VRING_ENDIAN: Row(_R, _R, (_REFUSED,), "rings are little-endian (VERSION_1)"),
    _F.GET_CONFIG: Row(
        _Y,
        _Y,
        (_STATUS, _E + "test_failed_get_config_replies_with_size_0_and_the_session_goes_on", _GROW),
        "a read it cannot give: the Config header with size 0",
    ),
    _F.SET_CONFIG: Row(
        _Y,
        _Y,
        (_STATUS, _E + "test_set_config_honours_its_flags"),
        "blk: the CONFIG_WCE cache mode; anything else is refused. Flags 1 (migration): the "
        "source's config space, whose bytes must equal ours where not writable; other flags "
        "are refused",
    ),
    _F.CREATE_CRYPTO_SESSION: Row(_R, _R, (_REFUSED,), "session id -1"),
    _F.CLOSE_CRYPTO_SESSION: Row(_R, _R, (_REFUSED,)),
    _F.POSTCOPY_ADVISE: Row(_R, _R, (_REFUSED,), "postcopy: see below"),
    _F.POSTCOPY_LISTEN: Row(_R, _R, (_REFUSED,), "postcopy: see below"),
    _F.POSTCOPY_END: Row(_R, _R, (_REFUSED,), "postcopy: see below"),
    _F.GET_INFLIGHT_FD: Row(
        _Y,
        _Y,
        (
            _INFLIGHT + "test_get_inflight_fd_returns_a_zeroed_region_of_the_spec_size",
            _INFLIGHT_QEMU,
            _INFLIGHT_VVU,
            _INFLIGHT_FILE,
            _E + "test_failed_get_inflight_fd_replies_with_mmap_size_0_and_no_fd",
        ),
        "blk; over VVU the device allocates the region (shmid 3) and passes its fd; with "
        "--frontend-memory the region is the device's own memfd (BAR3); a region it cannot "
        "give: mmap_size 0, no fd",
    ),
    _F.SET_INFLIGHT_FD: Row(
        _Y,
        _Y,
        (
            _INFLIGHT + "test_set_inflight_fd_refuses_a_region_too_small_or_misplaced",
            _INFLIGHT_KILLS,
            _INFLIGHT_FILE,
        ),
        "blk; over VVU the front-end's region becomes shmid 3; with --frontend-memory it must "
        "be the device's memfd",
    ),
    _F.GPU_SET_SOCKET: Row(
        _R,
        _R,
        (_REFUSED,),
        "no GPU device; over VVU the device passes no fd: a failure ack, then dropped",
    ),
    _F.RESET_DEVICE: Row(
        _Y, _Y, (_E + "test_reset_device_stops_everything_and_a_new_handshake_works",)
    ),
    _F.VRING_KICK: Row(_Y, _Y, (_INBAND, _INBAND_NET, _INBAND_RAW), "INBAND_NOTIFICATIONS"),
    _F.GET_MAX_MEM_SLOTS: Row(_Y, _Y, (_MEM_SLOTS,)),
    _F.ADD_MEM_REG: Row(_Y, _Y, (_MEM_SLOTS,)),
    _F.REM_MEM_REG: Row(_Y, _Y, (_MEM_SLOTS,)),
    _F.SET_STATUS: Row(
        _Y,
        _Y,
        (_STATUS, _RESET_STATUS, _NEEDS_RESET),
        "0 resets the device; a GET_VRING_BASE after it still answers where the ring stopped "
        '(see "SET_STATUS(0)" below)',
    ),
    _F.GET_STATUS: Row(
        _Y,
        _Y,
        (_STATUS, _NEEDS_RESET),
        "DEVICE_NEEDS_RESET (0x40) from a ring breaking until the driver resets the device",
    ),
    _F.GET_SHARED_OBJECT: Row(_R, _R, (_REFUSED,), "empty reply without fd: not found"),
    _F.SET_DEVICE_STATE_FD: Row(
        _Y,
        _X,
        (_STATE, _STATE_BAD, _STATE_VVU, _STATE_RETURNED_FD),
        "blk; the engine uses the front-end's fd, our front-end also a returned one",
    ),
    _F.CHECK_DEVICE_STATE: Row(_Y, _X, (_STATE, _STATE_BAD), "blk"),
    _F.GET_SHMEM_CONFIG: Row(_R, _R, (_REFUSED,), "no regions"),
    _F.GET_VRING_BASE_SKIP_DRAIN: Row(
        _R, _R, (_REFUSED,), "no failure form: the front-end is dropped"
    ),
}

_B = BackendRequest
BACKEND_ROWS: Final[dict[BackendRequest, Row]] = {
    _B.BACKEND_IOTLB_MSG: Row(
        _Y, _Y, (_IOMMU_IO, _IOMMU_QEMU, _IOMMU_QEMU_VVU), "misses, sent without NEED_REPLY"
    ),
    _B.BACKEND_CONFIG_CHANGE_MSG: Row(
        _Y,
        _Y,
        (
            _CONFIG_CHANGE,
            _E + "test_blk_resize_while_running_reaches_our_frontend",
            _GROW,
            _SUSPENDED,
        ),
        "blk resize: SIGHUP or `BlkBackend.resize`; acked with REPLY_ACK. A suspended device "
        "(no ring started) sends no back-end request: a change then is announced once, when a "
        "ring starts",
    ),
    _B.BACKEND_VRING_HOST_NOTIFIER_MSG: Row(_N, _X, (_FRONTEND_REFUSES,)),
    _B.BACKEND_VRING_CALL: Row(
        _Y, _Y, (_INBAND, _INBAND_NET, _INBAND_RAW), "INBAND_NOTIFICATIONS; with NEED_REPLY"
    ),
    _B.BACKEND_VRING_ERR: Row(_Y, _Y, (_INBAND_RAW,), "INBAND_NOTIFICATIONS; with NEED_REPLY"),
    _B.BACKEND_SHARED_OBJECT_ADD: Row(_N, _X, (_FRONTEND_REFUSES,)),
    _B.BACKEND_SHARED_OBJECT_REMOVE: Row(_N, _X, (_FRONTEND_REFUSES,)),
    _B.BACKEND_SHARED_OBJECT_LOOKUP: Row(_N, _X, (_FRONTEND_REFUSES,)),
    _B.BACKEND_SHMEM_MAP: Row(_N, _X, (_FRONTEND_REFUSES,)),
    _B.BACKEND_SHMEM_UNMAP: Row(_N, _X, (_FRONTEND_REFUSES,)),
}

_P = ProtocolFeature
FEATURE_ROWS: Final[dict[ProtocolFeature, Row]] = {
    _P.MQ: Row(_Y, _Y, (_STATUS, _E + "test_cloud_hypervisor_order")),
    _P.LOG_SHMFD: Row(_Y, _Y, (_LOG_BASE, _MIGRATION, _LOG_VVU), _LOG_NOTE),
    _P.RARP: Row(_Y, _Y, (_NET,), "net only"),
    _P.REPLY_ACK: Row(
        _Y,
        _Y,
        (_E + "test_reply_ack_is_one_u64_with_flags_0x5_and_the_request_id", _E + "test_bad_input"),
        "a malformed request that asked for an ack gets a failure ack, then the hang-up",
    ),
    _P.MTU: Row(_Y, _Y, (_NET,), "net only"),
    _P.BACKEND_REQ: Row(_Y, _Y, (_CONFIG_CHANGE, _GROW)),
    _P.CROSS_ENDIAN: Row(_N, _N, (_REFUSED,)),
    _P.CRYPTO_SESSION: Row(_N, _N, (_REFUSED,)),
    _P.PAGEFAULT: Row(_N, _N, (_REFUSED,), "postcopy: see below"),
    _P.CONFIG: Row(_Y, _Y, (_STATUS, _GROW)),
    _P.BACKEND_SEND_FD: Row(_N, _X, note="no back-end request of ours carries an fd"),
    _P.HOST_NOTIFIER: Row(_N, _X),
    _P.INFLIGHT_SHMFD: Row(
        _Y,
        _Y,
        (
            _INFLIGHT_KILLS,
            _INFLIGHT_QEMU,
            _INFLIGHT + "test_only_devices_whose_queues_track_inflight_offer_it",
            _INFLIGHT_VVU,
        ),
        "blk (split and packed rings); over VVU the region is the device's shmid 3",
    ),
    _P.RESET_DEVICE: Row(
        _Y, _Y, (_E + "test_reset_device_stops_everything_and_a_new_handshake_works",)
    ),
    _P.INBAND_NOTIFICATIONS: Row(
        _Y,
        _Y,
        (_INBAND, _INBAND_NET, _INBAND_RAW, _INBAND_NEEDS),
        "needs REPLY_ACK and BACKEND_REQ (without them the connection is closed); only for "
        "rings given no fd (NOFD)",
    ),
    _P.CONFIGURE_MEM_SLOTS: Row(_Y, _Y, (_MEM_SLOTS,)),
    _P.STATUS: Row(_Y, _Y, (_STATUS, _RESET_STATUS, _NEEDS_RESET)),
    _P.XEN_MMAP: Row(_N, _N),
    _P.SHARED_OBJECT: Row(_N, _X, (_REFUSED,)),
    _P.DEVICE_STATE: Row(_Y, _X, (_STATE, _STATE_VVU), "blk (devices with `has_state`)"),
    _P.GET_VRING_BASE_INFLIGHT: Row(_N, _N, note="needs inflight tracking"),
    _P.GPA_ADDRESSES: Row(_N, _N),
    _P.SHMEM: Row(_N, _X, (_REFUSED,)),
    _P.GET_VRING_BASE_SKIP_DRAIN: Row(_N, _N, (_REFUSED,), "needs inflight tracking"),
}

_HEADER = """\
# vhost-user protocol support

<!-- Generated from python/vvu/protocol/support.py; do not edit. Regenerate with:
     .venv/bin/python -m vvu.protocol.support > docs/protocol-support.md
     tests/test_protocol_support.py fails when this file is stale. -->

Every request of both channels and every protocol feature of the reference
(`shared/reference/vhost-user-protocol.md` §3 to §5), as the engine (`vvu serve`) supports it over
AF_UNIX and through the virtio-vhost-user device (`vvu serve --vvu`, `docs/vvu-device.md`), and
the tests that prove it. Back-end requests: "yes" means the engine sends it and our front-end
(`vvu.frontend`) handles it.
"""

_FOOTER = """\
## Ring states

A ring is stopped until SET_VRING_KICK (or an in-band VRING_KICK) and again after GET_VRING_BASE;
it is enabled by SET_VRING_ENABLE(1), or from SET_FEATURES on without PROTOCOL_FEATURES. A
started and enabled ring runs its device worker. A started but disabled ring must be processed
"without causing any side effects" (vhost-user.rst, "Ring states"): net's transmit queues then
take every frame and complete it unsent ("process and discard any TX packets"); every other
queue (blk, rng, net receive) is left alone until it is enabled, because completing a disk
request or filling a buffer is the side effect. `Backend.disabled_worker` says which.

While every ring is stopped the device is suspended (vhost-user.rst, "Suspended device state"):
from the start of a session until a ring starts, and again once the last one stopped. No
back-end request goes out then: `BackendEngine.backend_request` waits for a ring to start (the
session ending fails it), and `notify_config_change` (a SIGHUP resize) returns False and notes
the change, announced once when a ring starts.

## SET_STATUS(0)

Writing 0 to the status resets the device (virtio 1.2, 2.1). QEMU sends it when it stops the
vhost device, and the two QEMU generations we meet disagree on when: QEMU 7.2's
`vhost_user_dev_start(dev, false)` sends it first, before SET_VRING_ENABLE(0) and the
GET_VRING_BASEs; QEMU 8.1 moved it after them ("vhost-user: send SET_STATUS 0 after
GET_VRING_BASE", `vhost_user_reset_status`). So the reset may not lose what a GET_VRING_BASE
after it must answer. vvu's reset:

- stops every ring, each after its in-flight requests completed (as GET_VRING_BASE does), so
  the inflight region holds nothing in flight and each ring's stop position is kept: a
  GET_VRING_BASE after the reset answers it, and SET_VRING_BASE + SET_VRING_KICK start again;
- resets the device's own state (`Backend.reset`: blk's cache mode and serial, net's queued
  frames) and clears DEVICE_NEEDS_RESET;
- keeps what belongs to the connection, which QEMU sends again at the next start anyway: the
  memory table, the negotiated features, ring sizes, addresses and call/err eventfds, the
  inflight region, the back-end channel.

A device state saved (SET_DEVICE_STATE_FD) after SET_STATUS(0) is the reset device's.

## Postcopy

POSTCOPY_ADVISE, POSTCOPY_LISTEN and POSTCOPY_END are refused and PAGEFAULT is never offered.
userfaultfd itself is usable on the machine this was written on (`/dev/userfaultfd` exists, the
syscall works as root, `vm.unprivileged_userfaultfd` is 0), so the reason is the engine, not
the kernel: postcopy needs the back-end to register every guest memory region with
UFFDIO_REGISTER, answer SET_MEM_TABLE/ADD_MEM_REG with its own mapped addresses, and hand the
userfaultfd to the front-end, which then resolves faults that the Rust queue workers would take
on guest memory in the middle of a request. None of that exists, and the newest protocol text
says CONFIGURE_MEM_SLOTS (which we offer) disables postcopy anyway. ADVISE gets an empty reply
without an fd (failure), LISTEN a failure ack, END a u64 failure.
"""


def _cell(status: Status) -> str:
    return status.value


def _tests(row: Row) -> str:
    return "<br>".join(f"`{test}`" for test in row.tests) or "-"


def _table(title: str, first: str, rows: Mapping[_Member, Row]) -> list[str]:
    lines = [
        f"## {title}",
        "",
        f"| {first} | AF_UNIX | VVU | tested by | note |",
        "|---|---|---|---|---|",
    ]
    for member, row in sorted(rows.items(), key=lambda item: int(item[0])):
        name = f"{int(member)} {member.name}"
        lines.append(
            f"| {name} | {_cell(row.unix)} | {_cell(row.vvu)} | {_tests(row)} | {row.note} |"
        )
    return [*lines, ""]


def render() -> str:
    """The whole of docs/protocol-support.md."""
    lines = [
        _HEADER,
        "| status | meaning |",
        "|---|---|",
        *(f"| {status.value} | {meaning} |" for status, meaning in _MEANINGS.items()),
        "",
        *_table("Front-end requests (main socket)", "request", FRONTEND_ROWS),
        *_table("Back-end requests (back-end channel)", "request", BACKEND_ROWS),
        *_table("Protocol features", "bit", FEATURE_ROWS),
    ]
    return "\n".join(lines) + "\n" + _FOOTER


if __name__ == "__main__":
    print(render(), end="")
