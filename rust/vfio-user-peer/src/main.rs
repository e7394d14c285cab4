//! Conformance peer: drives a vfio-user server with the client of rust-vmm's `vfio_user` crate
//! (an implementation we did not write), checks what it sees, prints a JSON summary on stdout
//! and exits 0 when every check passed (1 otherwise, with the failed check on stderr).
//!
//! Usage: `vfio-user-peer SOCKET_PATH` against `vvu.vfio_user.echo.EchoDevice` (every vfio-user
//! command the crate has), `vfio-user-peer --vvu SOCKET_PATH` against the virtio-vhost-user
//! device itself (`vvu.device.vvu.VvuDevice`): its virtio-pci layout found the way a driver
//! finds it (capability walk), feature negotiation, its config space and BACKEND_UP.
//!
//! Work-arounds for `vfio_user` 0.1.7 client bugs (none needs a change in the server):
//! - `Client::resettable()` is inverted (`flags & RESET != RESET` binds as `flags & (RESET !=
//!   RESET)`, i.e. always false here); we report the raw value and send DEVICE_RESET anyway.
//! - The client reads fixed-size replies without looking at the ERROR flag or the message id, so
//!   one error reply desynchronises the stream; we only send requests that must succeed.
//! - The client ignores the server's `max_msg_fds` / `max_data_xfer_size`; we stay far below.
//! - GET_REGION_IO_FDS, DMA_READ/WRITE, WRITE_MULTI are not implemented by the client: not tested.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::ExitCode;

use serde_json::{json, Value};
use vfio_user::Client;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

// struct vfio_region_info flags, irq indexes and SET_IRQS flags (linux/vfio.h).
const REGION_READ: u32 = 1;
const REGION_WRITE: u32 = 2;
const REGION_MMAP: u32 = 4;
const IRQ_MSIX: u32 = 2;
const IRQ_DATA_NONE: u32 = 1;
const IRQ_DATA_EVENTFD: u32 = 4;
const IRQ_ACTION_TRIGGER: u32 = 32;

// The echo device (python/vvu/vfio_user/echo.py).
const VENDOR_ID: u16 = 0x1B36;
const DEVICE_ID: u16 = 0x10F0;
const MSIX_VECTORS: u32 = 4;
const MAGIC: u32 = 0x4F48_4345;
const BAR0: u32 = 0;
const BAR2: u32 = 2;
const CONFIG: u32 = 7;
const REG_MAGIC: u64 = 0x00;
const REG_SCRATCH0: u64 = 0x04;
const REG_SCRATCH1: u64 = 0x08;
const REG_IRQ: u64 = 0x0C;
const REG_DOORBELL: u64 = 0x10;
const REG_DOORBELL_COUNT: u64 = 0x14;
const REG_IRQ_COUNT: u64 = 0x18;
const REG_DMA_ADDR: u64 = 0x20;
const REG_DMA_LEN: u64 = 0x28;
const REG_DMA_CMD: u64 = 0x2C;
const REG_DMA_STATUS: u64 = 0x30;
const BUFFER: u64 = 0x100;
const DMA_DONE: u32 = 2;
const DMA_IOVA: u64 = 0x20_0000;
const DMA_SIZE: u64 = 0x2000;

type Result<T> = std::result::Result<T, String>;

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(what())
    }
}

struct Peer {
    client: Client,
}

impl Peer {
    fn read(&mut self, region: u32, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut data = vec![0u8; len];
        self.client
            .region_read(region, offset, &mut data)
            .map_err(|e| format!("REGION_READ {region}@{offset:#x}: {e}"))?;
        Ok(data)
    }

    fn read_u32(&mut self, region: u32, offset: u64) -> Result<u32> {
        let data = self.read(region, offset, 4)?;
        Ok(u32::from_le_bytes(data.try_into().expect("4 bytes")))
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.client
            .region_write(region, offset, data)
            .map_err(|e| format!("REGION_WRITE {region}@{offset:#x}: {e}"))
    }

    fn write_u32(&mut self, region: u32, offset: u64, value: u32) -> Result<()> {
        self.write(region, offset, &value.to_le_bytes())
    }
}

fn regions(peer: &Peer) -> Result<Value> {
    let mut out = Vec::new();
    for index in 0..9 {
        let r = peer
            .client
            .region(index)
            .ok_or_else(|| format!("the client has no region {index}"))?;
        out.push(json!({
            "index": r.index,
            "flags": r.flags,
            "size": r.size,
            "fd": r.file_offset.is_some(),
            "fd_offset": r.file_offset.as_ref().map(|f| f.start()),
            "sparse_areas": r.sparse_areas.iter().map(|a| [a.offset, a.size]).collect::<Vec<_>>(),
        }));
    }
    let bar0 = peer.client.region(BAR0).expect("checked");
    check(
        bar0.size == 0x1000 && bar0.flags & (REGION_READ | REGION_WRITE | REGION_MMAP) == 3,
        || format!("BAR0: {bar0:?}"),
    )?;
    let bar2 = peer.client.region(BAR2).expect("checked");
    let areas: Vec<(u64, u64)> = bar2
        .sparse_areas
        .iter()
        .map(|a| (a.offset, a.size))
        .collect();
    check(
        bar2.size == 0x4000
            && bar2.flags & REGION_MMAP != 0
            && bar2.file_offset.is_some()
            && areas == [(0, 0x1000), (0x2000, 0x2000)],
        || format!("BAR2: {bar2:?}"),
    )?;
    let config = peer.client.region(CONFIG).expect("checked");
    check(config.size == 256, || format!("config: {config:?}"))?;
    Ok(Value::Array(out))
}

fn irqs(peer: &mut Peer) -> Result<Value> {
    let mut out = Vec::new();
    for index in 0..5 {
        let info = peer
            .client
            .get_irq_info(index)
            .map_err(|e| format!("IRQ_INFO {index}: {e}"))?;
        check(info.index == index, || {
            format!("IRQ_INFO {index}: {info:?}")
        })?;
        out.push(json!({"index": info.index, "flags": info.flags, "count": info.count}));
    }
    check(out[IRQ_MSIX as usize]["count"] == MSIX_VECTORS, || {
        format!("MSI-X vectors: {}", out[2])
    })?;
    Ok(Value::Array(out))
}

fn config_space(peer: &mut Peer) -> Result<Value> {
    let cfg = peer.read(CONFIG, 0, 256)?;
    let u16_at = |o: usize| u16::from_le_bytes([cfg[o], cfg[o + 1]]);
    let (vendor, device, status) = (u16_at(0), u16_at(2), u16_at(6));
    check(vendor == VENDOR_ID && device == DEVICE_ID, || {
        format!("ids {vendor:#06x}:{device:#06x}")
    })?;
    check(status & 0x10 != 0, || "no capability list".into())?;
    let mut caps = Vec::new();
    let mut msix_size = None;
    let mut pos = usize::from(cfg[0x34]);
    while pos >= 0x40 && caps.len() < 48 {
        caps.push(json!({"id": cfg[pos], "offset": pos}));
        if cfg[pos] == 0x11 {
            msix_size = Some(u32::from(u16_at(pos + 2) & 0x7FF) + 1);
        }
        pos = usize::from(cfg[pos + 1]);
    }
    check(msix_size == Some(MSIX_VECTORS), || {
        format!("MSI-X table size {msix_size:?}")
    })?;

    // BAR sizing the way cloud-hypervisor does it: all-ones, read back, restore.
    let mut sizes = Vec::new();
    for (reg, expect) in [
        (0x10u64, 0xFFFF_F000u32),
        (0x18, 0xFFFF_C00C),
        (0x1C, 0xFFFF_FFFF),
    ] {
        peer.write_u32(CONFIG, reg, 0xFFFF_FFFF)?;
        let got = peer.read_u32(CONFIG, reg)?;
        peer.write_u32(CONFIG, reg, 0)?;
        check(got == expect, || {
            format!("BAR register {reg:#x} sized {got:#x}, expected {expect:#x}")
        })?;
        sizes.push(json!({"register": reg, "readback": got}));
    }
    // ROM sizing must read back 0 (no ROM).
    peer.write_u32(CONFIG, 0x30, 0xFFFF_F800)?;
    let rom = peer.read_u32(CONFIG, 0x30)?;
    check(rom == 0, || format!("ROM BAR reads {rom:#x}"))?;

    Ok(json!({
        "vendor_id": vendor,
        "device_id": device,
        "status": status,
        "capabilities": caps,
        "msix_table_size": msix_size,
        "bar_sizing": sizes,
    }))
}

fn wait_eventfd(efd: &EventFd, timeout_ms: i32) -> Result<u64> {
    let mut pfd = libc::pollfd {
        fd: efd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    check(n == 1, || format!("no interrupt within {timeout_ms} ms"))?;
    efd.read().map_err(|e| format!("eventfd read: {e}"))
}

fn bar0_and_msix(peer: &mut Peer) -> Result<Value> {
    let efd = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
    peer.client
        .set_irqs(
            IRQ_MSIX,
            IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
            0,
            1,
            &[efd.as_raw_fd()],
        )
        .map_err(|e| format!("SET_IRQS: {e}"))?;

    let magic = peer.read_u32(BAR0, REG_MAGIC)?;
    check(magic == MAGIC, || format!("magic {magic:#x}"))?;
    peer.write_u32(BAR0, REG_SCRATCH0, 0xDEAD_BEEF)?;
    peer.write_u32(BAR0, REG_SCRATCH1, 0x1234_5678)?;
    let s0 = peer.read_u32(BAR0, REG_SCRATCH0)?;
    let s1 = peer.read_u32(BAR0, REG_SCRATCH1)?;
    check(s0 == 0xDEAD_BEEF && s1 == 0x1234_5678, || {
        format!("scratch reads {s0:#x} {s1:#x}")
    })?;
    // Byte-granular access: one byte in the middle of SCRATCH1.
    peer.write(BAR0, REG_SCRATCH1 + 1, &[0xAB])?;
    let s1b = peer.read_u32(BAR0, REG_SCRATCH1)?;
    check(s1b == 0x1234_AB78, || format!("byte write gave {s1b:#x}"))?;
    // RO register keeps its value.
    peer.write_u32(BAR0, REG_MAGIC, 0)?;
    check(peer.read_u32(BAR0, REG_MAGIC)? == MAGIC, || {
        "MAGIC is writable".into()
    })?;

    peer.write_u32(BAR0, REG_IRQ, 0)?; // raise MSI-X vector 0
    let signalled = wait_eventfd(&efd, 5000)?;
    let irq_count = peer.read_u32(BAR0, REG_IRQ_COUNT)?;
    check(irq_count == 1, || format!("IRQ_COUNT {irq_count}"))?;

    peer.write_u32(BAR0, REG_DOORBELL, 1)?;
    let doorbells = peer.read_u32(BAR0, REG_DOORBELL_COUNT)?;
    check(doorbells == 1, || format!("DOORBELL_COUNT {doorbells}"))?;

    // Unbind the whole type (NONE|TRIGGER, 0, 0), as cloud-hypervisor does on MSI-X disable.
    peer.client
        .set_irqs(IRQ_MSIX, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, 0, 0, &[])
        .map_err(|e| format!("SET_IRQS disable: {e}"))?;

    Ok(json!({
        "magic": magic,
        "scratch": [s0, s1b],
        "msix_vector0_signalled": signalled,
        "irq_count": irq_count,
        "doorbell_count": doorbells,
    }))
}

struct Mapping {
    addr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(fd: i32, len: usize, offset: u64) -> Result<Self> {
        // SAFETY: a fresh shared mapping of a file the server gave us; nothing else is touched.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            )
        };
        check(addr != libc::MAP_FAILED, || {
            format!("mmap: {}", std::io::Error::last_os_error())
        })?;
        Ok(Self {
            addr: addr.cast(),
            len,
        })
    }

    fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len);
        // SAFETY: in bounds of a live mapping; the server only reads it concurrently.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.addr.add(offset), data.len()) }
    }

    fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.len);
        let mut out = vec![0u8; len];
        // SAFETY: in bounds of a live mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.addr.add(offset), out.as_mut_ptr(), len) }
        out
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what new() mapped.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

fn sparse_mmap(peer: &mut Peer) -> Result<Value> {
    let bar2 = peer.client.region(BAR2).expect("checked");
    let file_offset = bar2.file_offset.as_ref().ok_or("BAR2 has no fd")?;
    let fd = file_offset.file().as_raw_fd();
    let base = file_offset.start();
    let areas: Vec<(u64, u64)> = bar2
        .sparse_areas
        .iter()
        .map(|a| (a.offset, a.size))
        .collect();
    let maps = areas
        .iter()
        .map(|&(off, size)| Mapping::new(fd, size as usize, base + off))
        .collect::<Result<Vec<_>>>()?;

    // Client → device: write through the second area's mapping, read it back by message.
    let ours = b"written-by-rust-mmap";
    maps[1].write(0x10, ours);
    let seen = peer.read(BAR2, areas[1].0 + 0x10, ours.len())?;
    check(seen == ours, || format!("server sees {seen:?} in BAR2"))?;
    // Device → client: write by message, see it in the first area's mapping.
    let theirs = b"written-by-message";
    peer.write(BAR2, areas[0].0 + 0x20, theirs)?;
    let got = maps[0].read(0x20, theirs.len());
    check(got == theirs, || format!("mapping shows {got:?}"))?;
    // The hole between the areas is emulated: reachable by message.
    peer.write(BAR2, 0x1000, b"hole")?;
    check(peer.read(BAR2, 0x1000, 4)? == b"hole", || {
        "BAR2 hole is not RW".into()
    })?;
    Ok(json!({"areas": areas, "fd_offset": base, "both_ways": true}))
}

fn dma(peer: &mut Peer) -> Result<Value> {
    let name = c"vvu-peer-dma";
    // SAFETY: memfd_create with a valid C string; the fd is owned by the File below.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    check(raw >= 0, || {
        format!("memfd_create: {}", std::io::Error::last_os_error())
    })?;
    // SAFETY: a fresh fd nobody else owns.
    let mut mem = unsafe { File::from_raw_fd(raw) };
    mem.set_len(DMA_SIZE).map_err(|e| e.to_string())?;
    let pattern = b"client memory, read by the device";
    mem.write_all(pattern).map_err(|e| e.to_string())?;

    peer.client
        .dma_map(0, DMA_IOVA, DMA_SIZE, mem.as_raw_fd())
        .map_err(|e| format!("DMA_MAP: {e}"))?;

    // Device reads client memory: DMA_ADDR/LEN, CMD 1 = copy into BUFFER.
    peer.write(BAR0, REG_DMA_ADDR, &DMA_IOVA.to_le_bytes())?;
    peer.write_u32(BAR0, REG_DMA_LEN, pattern.len() as u32)?;
    peer.write_u32(BAR0, REG_DMA_CMD, 1)?;
    let status = peer.read_u32(BAR0, REG_DMA_STATUS)?;
    let copied = peer.read(BAR0, BUFFER, pattern.len())?;
    check(status == DMA_DONE && copied == pattern, || {
        format!("DMA read: status {status}, buffer {copied:?}")
    })?;

    // Device writes client memory: CMD 2 = copy BUFFER to DMA_ADDR (second page).
    let back = b"device wrote this";
    peer.write(BAR0, BUFFER, back)?;
    peer.write(BAR0, REG_DMA_ADDR, &(DMA_IOVA + 0x1000).to_le_bytes())?;
    peer.write_u32(BAR0, REG_DMA_LEN, back.len() as u32)?;
    peer.write_u32(BAR0, REG_DMA_CMD, 2)?;
    let status2 = peer.read_u32(BAR0, REG_DMA_STATUS)?;
    let mut got = vec![0u8; back.len()];
    mem.read_exact_at(&mut got, 0x1000)
        .map_err(|e| e.to_string())?;
    check(status2 == DMA_DONE && got == back, || {
        format!("DMA write: status {status2}, memory {got:?}")
    })?;

    peer.client
        .dma_unmap(DMA_IOVA, DMA_SIZE)
        .map_err(|e| format!("DMA_UNMAP: {e}"))?;
    Ok(json!({"iova": DMA_IOVA, "size": DMA_SIZE, "device_read": true, "device_wrote": true}))
}

fn reset(peer: &mut Peer) -> Result<Value> {
    let reported = peer.client.resettable();
    // Work-around: the crate inverts FLAGS_RESET; reset regardless of what it reports.
    peer.client.reset().map_err(|e| format!("RESET: {e}"))?;
    let s0 = peer.read_u32(BAR0, REG_SCRATCH0)?;
    check(s0 == 0, || format!("SCRATCH0 after reset: {s0:#x}"))?;
    Ok(json!({"crate_resettable": reported, "scratch_after_reset": s0}))
}

fn run(path: &Path) -> Result<Value> {
    let client = Client::new(path).map_err(|e| format!("connect/VERSION/regions: {e}"))?;
    let mut peer = Peer { client };
    let summary = json!({
        "crate": "vfio_user",
        "regions": regions(&peer)?,
        "irqs": irqs(&mut peer)?,
        "config": config_space(&mut peer)?,
        "bar0": bar0_and_msix(&mut peer)?,
        "sparse_mmap": sparse_mmap(&mut peer)?,
        "dma": dma(&mut peer)?,
        "reset": reset(&mut peer)?,
    });
    peer.client
        .shutdown()
        .map_err(|e| format!("shutdown: {e}"))?;
    Ok(summary)
}

// virtio-pci (virtio 1.x §4.1): vendor capability types, common config registers, status bits.
const VIRTIO_VENDOR_ID: u16 = 0x1AF4;
const VVU_DEVICE_ID: u16 = 0x1040 + 63; // modern virtio-pci id of virtio-vhost-user
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_DEVICE: u8 = 4;
const COMMON_DFSELECT: u64 = 0x00;
const COMMON_DF: u64 = 0x04;
const COMMON_GFSELECT: u64 = 0x08;
const COMMON_GF: u64 = 0x0C;
const COMMON_NUMQ: u64 = 0x12;
const COMMON_STATUS: u64 = 0x14;
const COMMON_Q_SELECT: u64 = 0x16;
const COMMON_Q_SIZE: u64 = 0x18;
const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_FEATURES_OK: u8 = 8;
const VERSION_1: u64 = 1 << 32;
// The VVU device's config space (docs/vvu-device.md): status, max_vhost_queues, uuid.
const VVU_BACKEND_UP: u32 = 1;

/// Where a virtio structure lives: (BAR, offset) from its vendor capability.
fn virtio_cap(cfg: &[u8], cfg_type: u8) -> Option<(u32, u64)> {
    let mut pos = usize::from(cfg[0x34]);
    let mut seen = 0;
    while pos >= 0x40 && pos + 16 <= cfg.len() && seen < 48 {
        if cfg[pos] == CAP_VENDOR && cfg[pos + 3] == cfg_type {
            let offset = u32::from_le_bytes(cfg[pos + 8..pos + 12].try_into().expect("4 bytes"));
            return Some((u32::from(cfg[pos + 4]), u64::from(offset)));
        }
        pos = usize::from(cfg[pos + 1]);
        seen += 1;
    }
    None
}

fn read_u8(peer: &mut Peer, region: u32, offset: u64) -> Result<u8> {
    Ok(peer.read(region, offset, 1)?[0])
}

fn read_u16(peer: &mut Peer, region: u32, offset: u64) -> Result<u16> {
    let data = peer.read(region, offset, 2)?;
    Ok(u16::from_le_bytes([data[0], data[1]]))
}

/// The virtio-vhost-user device as a driver meets it, through the crate's client.
fn run_vvu(path: &Path) -> Result<Value> {
    let client = Client::new(path).map_err(|e| format!("connect/VERSION/regions: {e}"))?;
    let mut peer = Peer { client };
    let cfg = peer.read(CONFIG, 0, 256)?;
    let u16_at = |o: usize| u16::from_le_bytes([cfg[o], cfg[o + 1]]);
    let (vendor, device) = (u16_at(0), u16_at(2));
    check(
        vendor == VIRTIO_VENDOR_ID && device == VVU_DEVICE_ID,
        || format!("ids {vendor:#06x}:{device:#06x}"),
    )?;
    let (common_bar, common) = virtio_cap(&cfg, CFG_COMMON).ok_or("no COMMON capability")?;
    let (device_bar, devcfg) = virtio_cap(&cfg, CFG_DEVICE).ok_or("no DEVICE capability")?;
    let msix = peer
        .client
        .get_irq_info(IRQ_MSIX)
        .map_err(|e| format!("IRQ_INFO MSI-X: {e}"))?;

    // Reset, then negotiate VERSION_1 the way virtio 1.x §3.1.1 says.
    peer.write(common_bar, common + COMMON_STATUS, &[0])?;
    check(
        read_u8(&mut peer, common_bar, common + COMMON_STATUS)? == 0,
        || "status after reset".into(),
    )?;
    let mut offered = 0u64;
    for select in 0..2u32 {
        peer.write_u32(common_bar, common + COMMON_DFSELECT, select)?;
        offered |= u64::from(peer.read_u32(common_bar, common + COMMON_DF)?) << (32 * select);
    }
    check(offered & VERSION_1 != 0, || {
        format!("features {offered:#x}: no VERSION_1")
    })?;
    let ack = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
    peer.write(common_bar, common + COMMON_STATUS, &[ack])?;
    for select in 0..2u32 {
        peer.write_u32(common_bar, common + COMMON_GFSELECT, select)?;
        let half = (VERSION_1 >> (32 * select)) as u32;
        peer.write_u32(common_bar, common + COMMON_GF, half)?;
    }
    peer.write(
        common_bar,
        common + COMMON_STATUS,
        &[ack | STATUS_FEATURES_OK],
    )?;
    let status = read_u8(&mut peer, common_bar, common + COMMON_STATUS)?;
    check(status & STATUS_FEATURES_OK != 0, || {
        format!("FEATURES_OK not kept: status {status:#x}")
    })?;
    let num_queues = read_u16(&mut peer, common_bar, common + COMMON_NUMQ)?;
    check(num_queues >= 2, || {
        format!("{num_queues} queues (rxq, txq)")
    })?;
    let mut queue_sizes = Vec::new();
    for q in 0..num_queues {
        peer.write(common_bar, common + COMMON_Q_SELECT, &q.to_le_bytes())?;
        queue_sizes.push(read_u16(&mut peer, common_bar, common + COMMON_Q_SIZE)?);
    }

    // Device config: status, max_vhost_queues, uuid; BACKEND_UP is the driver's to set.
    let dc = peer.read(device_bar, devcfg, 24)?;
    let vvu_status = u32::from_le_bytes(dc[0..4].try_into().expect("4 bytes"));
    let max_queues = u32::from_le_bytes(dc[4..8].try_into().expect("4 bytes"));
    check(vvu_status == 0, || {
        format!("VVU status {vvu_status:#x} before BACKEND_UP")
    })?;
    peer.write_u32(device_bar, devcfg, VVU_BACKEND_UP)?;
    let up = peer.read_u32(device_bar, devcfg)?;
    check(up & VVU_BACKEND_UP != 0, || {
        format!("VVU status {up:#x} after BACKEND_UP")
    })?;
    peer.write_u32(device_bar, devcfg, 0)?;
    let down = peer.read_u32(device_bar, devcfg)?;
    check(down == 0, || {
        format!("VVU status {down:#x} after clearing BACKEND_UP")
    })?;

    // DEVICE_RESET puts the virtio status back to 0.
    peer.client.reset().map_err(|e| format!("RESET: {e}"))?;
    let after_reset = read_u8(&mut peer, common_bar, common + COMMON_STATUS)?;
    check(after_reset == 0, || {
        format!("status {after_reset:#x} after reset")
    })?;
    peer.client
        .shutdown()
        .map_err(|e| format!("shutdown: {e}"))?;
    Ok(json!({
        "crate": "vfio_user",
        "vendor_id": vendor,
        "device_id": device,
        "common": [common_bar, common],
        "device_cfg": [device_bar, devcfg],
        "msix_vectors": msix.count,
        "features": offered,
        "num_queues": num_queues,
        "queue_sizes": queue_sizes,
        "max_vhost_queues": max_queues,
        "uuid": dc[8..24].iter().map(|b| format!("{b:02x}")).collect::<String>(),
        "backend_up_read_back": up,
    }))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [path] => run(Path::new(path)),
        [flag, path] if flag == "--vvu" => run_vvu(Path::new(path)),
        _ => {
            eprintln!("usage: vfio-user-peer [--vvu] SOCKET_PATH");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("vfio-user-peer: {err}");
            ExitCode::FAILURE
        }
    }
}
