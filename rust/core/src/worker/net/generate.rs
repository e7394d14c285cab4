//! A frame source for benchmarks and tests: a port whose receive side never runs dry.
//!
//! A [`NetPort::generator`](super::NetPort::generator) port fills its guest's receive buffers
//! with IPv4/UDP frames as fast as the guest posts them, as DPDK testpmd's `txonly` mode does
//! on a `net_vhost` port; what the guest transmits is counted and discarded. It measures a
//! front-end's receive path (testpmd `rxonly`, a Linux guest's RX softirq) without a second
//! front-end or the kernel in the way.
//!
//! Every frame is a valid Ethernet II / IPv4 / UDP datagram: to the device's MAC from a source
//! MAC, [`SRC_IP`] port [`UDP_PORT`] → [`DST_IP`] port [`UDP_PORT`] (198.18.0.0/15, the block
//! RFC 2544 reserves for benchmarks; 9 is the discard port), DF set, TTL 64, IP and UDP
//! checksums filled in. The sizes asked for (Ethernet frame without FCS, [`MIN_SIZE`]..=
//! [`MAX_FRAME_LEN`]) are used in turn. The first 8 payload bytes are
//! the frame's sequence number on this port (big-endian, from 0; the UDP checksum is updated
//! incrementally, RFC 1624), the rest a fixed pattern (byte `i` of the payload is `i as u8`).
//! The virtio-net header is all zero (no offload, `num_buffers` set by the RX path).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use super::offload::{add_words, fold};
use super::{MAX_FRAME_LEN, PORT_HDR_LEN};
use crate::notify::EventFd;

/// Source address of generated frames.
pub const SRC_IP: [u8; 4] = [198, 18, 0, 1];
/// Destination address of generated frames.
pub const DST_IP: [u8; 4] = [198, 18, 0, 2];
/// UDP source and destination port (discard).
pub const UDP_PORT: u16 = 9;
/// Shortest frame generated: the Ethernet minimum without FCS.
pub const MIN_SIZE: usize = 60;
/// Ethernet, IPv4 and UDP headers.
const HEADERS: usize = 14 + 20 + 8;
/// Offset of the UDP checksum in a frame.
const UDP_CHECK: usize = 14 + 20 + 6;

/// The generator of one queue pair; see the module docs.
pub(super) struct Generator {
    /// One packet per size as on a port ([`PORT_HDR_LEN`] zero bytes, then the frame), with
    /// sequence number 0.
    templates: Vec<Vec<u8>>,
    /// Frames generated so far: the next one's sequence number.
    next: AtomicU64,
    /// Never signalled: a generator always has a frame (something for pollers to hold).
    idle: EventFd,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("sizes", &self.sizes())
            .field("next", &self.next.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The frame of `size` bytes with sequence number 0.
fn template(size: usize, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(size);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((size - 14) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&SRC_IP);
    ip[16..20].copy_from_slice(&DST_IP);
    let check = !fold(add_words(0, &ip));
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    f.extend_from_slice(&ip);
    let udp_len = (size - 34) as u16;
    f.extend_from_slice(&UDP_PORT.to_be_bytes());
    f.extend_from_slice(&UDP_PORT.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend((0..size - HEADERS).map(|i| i as u8));
    f[HEADERS..HEADERS + 8].fill(0); // the sequence number
    let mut sum = add_words(0, &SRC_IP);
    sum = add_words(sum, &DST_IP);
    sum += 17 + u64::from(udp_len);
    sum = add_words(sum, &f[34..]);
    let check = match !fold(sum) {
        0 => 0xffff, // RFC 768: a computed 0 is sent as all ones
        c => c,
    };
    f[UDP_CHECK..UDP_CHECK + 2].copy_from_slice(&check.to_be_bytes());
    let mut packet = vec![0u8; PORT_HDR_LEN];
    packet.extend_from_slice(&f);
    packet
}

impl Generator {
    /// Frames of `sizes` bytes in turn, to `dst` from `src`.
    pub(super) fn new(sizes: &[usize], dst: [u8; 6], src: [u8; 6]) -> io::Result<Self> {
        if sizes.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a generator needs at least one frame size",
            ));
        }
        if let Some(bad) = sizes
            .iter()
            .find(|s| !(MIN_SIZE..=MAX_FRAME_LEN).contains(s))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a generated frame is {MIN_SIZE}..={MAX_FRAME_LEN} bytes, not {bad}"),
            ));
        }
        Ok(Self {
            templates: sizes.iter().map(|&s| template(s, dst, src)).collect(),
            next: AtomicU64::new(0),
            idle: EventFd::new()?,
        })
    }

    /// The frame sizes, in the order they are used.
    pub(super) fn sizes(&self) -> Vec<usize> {
        self.templates
            .iter()
            .map(|t| t.len() - PORT_HDR_LEN)
            .collect()
    }

    /// How many frame sizes it takes in turn.
    pub(super) fn size_count(&self) -> usize {
        self.templates.len()
    }

    pub(super) fn idle(&self) -> &EventFd {
        &self.idle
    }

    /// Write the next packet (header and frame) into `buf` (at least [`PORT_HDR_LEN`] +
    /// the largest size long); returns its length. Only one thread (the port's RX worker, or
    /// a caller while none runs) generates at a time.
    pub(super) fn fill(&self, buf: &mut [u8]) -> usize {
        let seq = self.next.load(Ordering::Relaxed);
        self.next.store(seq.wrapping_add(1), Ordering::Relaxed);
        let template = &self.templates[(seq % self.templates.len() as u64) as usize];
        let packet = &mut buf[..template.len()];
        packet.copy_from_slice(template);
        let seq_bytes = seq.to_be_bytes();
        let at = PORT_HDR_LEN + HEADERS;
        packet[at..at + 8].copy_from_slice(&seq_bytes);
        // RFC 1624: HC' = ~(~HC + m') where the template's words m are 0.
        let check_at = PORT_HDR_LEN + UDP_CHECK;
        let old = u16::from_be_bytes([packet[check_at], packet[check_at + 1]]);
        let check = match !fold(add_words(u64::from(!old), &seq_bytes)) {
            0 => 0xffff,
            c => c,
        };
        packet[check_at..check_at + 2].copy_from_slice(&check.to_be_bytes());
        template.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071 the plain way: the ones'-complement sum of `data`, end-around carry per word.
    fn ones_sum(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for w in data.chunks(2) {
            sum += u32::from(w[0]) << 8 | u32::from(*w.get(1).unwrap_or(&0));
            if sum > 0xffff {
                sum -= 0xffff;
            }
        }
        sum as u16
    }

    fn udp_verifies(f: &[u8]) -> bool {
        let mut pseudo = f[26..34].to_vec();
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&f[38..40]);
        pseudo.extend_from_slice(&f[34..]);
        ones_sum(&pseudo) == 0xffff && f[40..42] != [0, 0]
    }

    #[test]
    fn frames_are_valid_udp_in_turn_with_sequence_numbers() {
        let dst = [2, 0, 0, 0, 0, 1];
        let src = [2, 0, 0, 0, 0, 2];
        let sizes = [60, 64, 1500, 1514, 9000, 65535];
        let g = Generator::new(&sizes, dst, src).unwrap();
        assert_eq!(g.sizes(), sizes);
        let mut buf = vec![0xaa; PORT_HDR_LEN + 65535];
        // Far enough for every sequence-number word to carry.
        for seq in (0..40u64).chain([0xffff, 0x1_0000, 0xffff_ffff_ffff]) {
            g.next.store(seq, Ordering::Relaxed);
            let n = g.fill(&mut buf);
            let size = sizes[(seq % sizes.len() as u64) as usize];
            assert_eq!(n, PORT_HDR_LEN + size);
            assert_eq!(&buf[..PORT_HDR_LEN], &[0; PORT_HDR_LEN], "no offload");
            let f = &buf[PORT_HDR_LEN..n];
            assert_eq!(
                (&f[..6], &f[6..12], &f[12..14]),
                (&dst[..], &src[..], &[8u8, 0][..])
            );
            assert_eq!(ones_sum(&f[14..34]), 0xffff, "IPv4 header checksum");
            assert_eq!(usize::from(u16::from_be_bytes([f[16], f[17]])), size - 14);
            assert_eq!(
                (f[23], &f[26..30], &f[30..34]),
                (17, &SRC_IP[..], &DST_IP[..])
            );
            assert_eq!(usize::from(u16::from_be_bytes([f[38], f[39]])), size - 34);
            assert!(udp_verifies(f), "UDP checksum, seq {seq}, size {size}");
            assert_eq!(u64::from_be_bytes(f[42..50].try_into().unwrap()), seq);
            assert!(f[50..].iter().enumerate().all(|(i, &b)| b == (i + 8) as u8));
        }
        assert_eq!(g.next.load(Ordering::Relaxed), 0xffff_ffff_ffff + 1);
    }

    #[test]
    fn sizes_are_bounded() {
        let m = [2, 0, 0, 0, 0, 1];
        assert!(Generator::new(&[], m, m).is_err());
        assert!(Generator::new(&[59], m, m).is_err());
        assert!(Generator::new(&[65536], m, m).is_err());
        assert!(Generator::new(&[60, 65535], m, m).is_ok());
    }
}
