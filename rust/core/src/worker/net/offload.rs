//! virtio-net header offloads (virtio 1.2 §5.1.6.2 and §5.1.6.4): checking what a guest asks
//! for on transmit, and doing the work in software for a receiver that did not negotiate it.
//!
//! A transmitted packet may carry a partial checksum (`VIRTIO_NET_HDR_F_NEEDS_CSUM` with
//! `csum_start`/`csum_offset`, feature CSUM) and be a TCP segmentation job (`gso_type`
//! TCPV4/TCPV6 with `gso_size`, features HOST_TSO4/6). [`validate`] refuses anything the
//! guest was not offered or that does not fit the frame; for GSO it parses the Ethernet, IP and
//! TCP headers itself (`hdr_len` from a guest is only a hint, and Linux sends the linear length
//! there), and refuses segments longer than the port's frame limit and more than
//! [`MAX_GSO_SEGS`] segments. The header travels with the frame through the switch; at the
//! receiving port [`complete_csum`] and [`segment`] do what the receiving guest did not offer
//! to do (GUEST_CSUM, GUEST_TSO4/6).

/// `flags`: the checksum from `csum_start` to the end is still to be computed (the field at
/// `csum_start + csum_offset` holds the pseudo-header sum).
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags` on receive: the checksum is known to be good.
pub const F_DATA_VALID: u8 = 2;
/// `gso_type`: no segmentation.
pub const GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv4.
pub const GSO_TCPV4: u8 = 1;
/// `gso_type`: TCP over IPv6.
pub const GSO_TCPV6: u8 = 4;
/// Most segments one GSO packet may be cut into (a 64 KiB packet at a 1448-byte MSS is 46).
pub const MAX_GSO_SEGS: usize = 1024;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Which offloads one direction has: what the device accepts from the guest (CSUM,
/// HOST_TSO4/6) or what the guest accepts from the device (GUEST_CSUM, GUEST_TSO4/6).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Partial checksums.
    pub csum: bool,
    /// TCP segmentation over IPv4 (only with `csum`).
    pub tso4: bool,
    /// TCP segmentation over IPv6 (only with `csum`).
    pub tso6: bool,
}

impl Offloads {
    /// No offload.
    pub const NONE: Self = Self {
        csum: false,
        tso4: false,
        tso6: false,
    };

    /// From the three feature bits; TSO without checksum offload is not a valid combination
    /// (§5.1.3.1) and counts as no TSO.
    pub fn new(csum: bool, tso4: bool, tso6: bool) -> Self {
        Self {
            csum,
            tso4: csum && tso4,
            tso6: csum && tso6,
        }
    }

    /// Whether a packet with this header can go to the guest as is.
    fn takes(&self, hdr: &VnetHdr) -> bool {
        let csum_ok = hdr.flags & F_NEEDS_CSUM == 0 || self.csum;
        let gso_ok = match hdr.gso_type {
            GSO_NONE => true,
            GSO_TCPV4 => self.tso4,
            GSO_TCPV6 => self.tso6,
            _ => false,
        };
        csum_ok && gso_ok
    }
}

/// The first 10 bytes of `virtio_net_hdr` (little-endian, VERSION_1 or a little-endian host).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

/// Bytes [`VnetHdr::parse`] reads and [`VnetHdr::write`] writes.
pub const VNET_HDR_FIELDS: usize = 10;

impl VnetHdr {
    /// From the first 10 bytes of `b` (missing bytes read as 0).
    pub fn parse(b: &[u8]) -> Self {
        let mut raw = [0u8; VNET_HDR_FIELDS];
        let n = b.len().min(VNET_HDR_FIELDS);
        raw[..n].copy_from_slice(&b[..n]);
        let le = |i: usize| u16::from_le_bytes([raw[i], raw[i + 1]]);
        Self {
            flags: raw[0],
            gso_type: raw[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        }
    }

    /// Into the first 10 bytes of `b` (which must hold them).
    pub fn write(&self, b: &mut [u8]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }
}

/// Why a header from the guest was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HdrError {
    /// A flag other than NEEDS_CSUM, or NEEDS_CSUM without CSUM negotiated.
    Flags,
    /// A `gso_type` not offered (UDP, ECN, unknown, TSO not negotiated), or GSO without
    /// NEEDS_CSUM.
    GsoType,
    /// `csum_start`/`csum_offset` point outside the frame.
    CsumRange,
    /// `hdr_len` is larger than the frame.
    HdrLen,
    /// A GSO frame whose headers are not Ethernet, IPv4/IPv6 and TCP as `gso_type` says, or
    /// an IPv4 fragment.
    Headers,
    /// `gso_size` 0, a segment longer than the frame limit, or more than [`MAX_GSO_SEGS`].
    GsoSize,
    /// A frame over the limit without GSO.
    TooLong,
}

/// Where the headers of a TCP frame end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TcpFrame {
    /// Start of the IP header.
    l3: usize,
    /// Start of the TCP header.
    l4: usize,
    /// Start of the payload (end of the headers).
    payload: usize,
    v6: bool,
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

/// Parse Ethernet (one optional VLAN tag), IPv4 or IPv6 (no extension headers) and TCP.
fn parse_tcp(frame: &[u8]) -> Option<TcpFrame> {
    let mut l3 = ETH_HLEN;
    let mut ethertype = be16(frame.get(..ETH_HLEN)?, 12);
    if ethertype == ETH_P_8021Q {
        ethertype = be16(frame.get(..ETH_HLEN + 4)?, 16);
        l3 += 4;
    }
    let (l4, v6) = match ethertype {
        ETH_P_IP => {
            let ip = frame.get(l3..l3 + 20)?;
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let frag = be16(ip, 6) & 0x3fff; // MF and the fragment offset
            if ip[0] >> 4 != 4 || ihl < 20 || ip[9] != IPPROTO_TCP || frag != 0 {
                return None;
            }
            (l3 + ihl, false)
        }
        ETH_P_IPV6 => {
            let ip = frame.get(l3..l3 + 40)?;
            if ip[0] >> 4 != 6 || ip[6] != IPPROTO_TCP {
                return None;
            }
            (l3 + 40, true)
        }
        _ => return None,
    };
    let doff = usize::from(frame.get(l4 + 12)? >> 4) * 4;
    if doff < 20 || l4 + doff > frame.len() {
        return None;
    }
    Some(TcpFrame {
        l3,
        l4,
        payload: l4 + doff,
        v6,
    })
}

/// Check the header the guest sent with `frame` against what it may ask for (`allowed`) and
/// the longest frame it may send without GSO (`max_frame`). Returns the header to carry: flags
/// and fields not in use zeroed, and for GSO `hdr_len` set to the real header length.
pub fn validate(
    hdr: &VnetHdr,
    frame: &[u8],
    max_frame: usize,
    allowed: Offloads,
) -> Result<VnetHdr, HdrError> {
    let head = &frame[..frame.len().min(MAX_HEADERS)];
    validate_head(hdr, head, frame.len(), max_frame, allowed)
}

/// Longest Ethernet (with VLAN), IP and TCP headers: what [`validate_head`] needs to see.
pub const MAX_HEADERS: usize = 18 + 60 + 60;

/// [`validate`] for a frame of `len` bytes of which `head` is the first
/// `min(len, MAX_HEADERS)`.
pub fn validate_head(
    hdr: &VnetHdr,
    head: &[u8],
    len: usize,
    max_frame: usize,
    allowed: Offloads,
) -> Result<VnetHdr, HdrError> {
    let frame = head;
    let mut out = VnetHdr::default();
    if hdr.flags & !F_NEEDS_CSUM != 0 || (hdr.flags & F_NEEDS_CSUM != 0 && !allowed.csum) {
        return Err(HdrError::Flags);
    }
    if hdr.flags & F_NEEDS_CSUM != 0 {
        let start = usize::from(hdr.csum_start);
        if start + usize::from(hdr.csum_offset) + 2 > len {
            return Err(HdrError::CsumRange);
        }
        out.flags = F_NEEDS_CSUM;
        out.csum_start = hdr.csum_start;
        out.csum_offset = hdr.csum_offset;
    }
    let v6 = match hdr.gso_type {
        GSO_NONE => {
            return if len > max_frame {
                Err(HdrError::TooLong)
            } else {
                Ok(out)
            };
        }
        GSO_TCPV4 if allowed.tso4 => false,
        GSO_TCPV6 if allowed.tso6 => true,
        _ => return Err(HdrError::GsoType),
    };
    if out.flags & F_NEEDS_CSUM == 0 {
        return Err(HdrError::GsoType);
    }
    // hdr_len is a hint the device must not rely on (virtio 1.2, 5.1.6.2); without GSO it is
    // not used at all, so only a GSO packet's is held to the frame.
    if usize::from(hdr.hdr_len) > len {
        return Err(HdrError::HdrLen);
    }
    let tcp = parse_tcp(frame).ok_or(HdrError::Headers)?;
    if tcp.v6 != v6 || usize::from(hdr.csum_start) != tcp.l4 || hdr.csum_offset != 16 {
        return Err(HdrError::Headers);
    }
    let gso_size = usize::from(hdr.gso_size);
    if gso_size == 0
        || tcp.payload + gso_size > max_frame
        || (len - tcp.payload).div_ceil(gso_size) > MAX_GSO_SEGS
    {
        return Err(HdrError::GsoSize);
    }
    out.gso_type = hdr.gso_type;
    out.gso_size = hdr.gso_size;
    out.hdr_len = tcp.payload as u16;
    Ok(out)
}

/// What a receiving guest should get for a packet with `hdr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxAction {
    /// Deliver with this header (NEEDS_CSUM and GSO as the guest takes them).
    Pass(VnetHdr),
    /// Complete the checksum in software ([`complete_csum`]), then deliver with flags 0.
    Checksum,
    /// Cut into segments in software ([`segment`]).
    Segment,
}

/// Decide for a packet (header already validated) and a receiver with `guest` offloads.
pub fn rx_action(hdr: &VnetHdr, guest: Offloads) -> RxAction {
    if guest.takes(hdr) {
        let mut out = *hdr;
        if !guest.csum {
            out.flags &= !F_DATA_VALID;
        }
        return RxAction::Pass(out);
    }
    if hdr.gso_type != GSO_NONE {
        RxAction::Segment
    } else {
        RxAction::Checksum
    }
}

/// Add `data` as big-endian 16-bit words to `sum` (an odd last byte padded with zero).
pub(super) fn add_words(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

pub(super) fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Finish a partial checksum in place: the ones'-complement sum from `start` to the end
/// (including the pseudo-header sum already in the field) goes, complemented, into the field
/// at `start + offset`. `false` (nothing changed) if the field is not inside `frame`.
pub fn complete_csum(frame: &mut [u8], start: usize, offset: usize) -> bool {
    let field = start + offset;
    if field + 2 > frame.len() {
        return false;
    }
    let csum = !fold(add_words(0, &frame[start..]));
    frame[field..field + 2].copy_from_slice(&csum.to_be_bytes());
    true
}

/// The TCP checksum of `frame[tcp.l4..]` with its pseudo-header.
fn tcp_csum(frame: &[u8], tcp: &TcpFrame) -> u16 {
    let seg_len = frame.len() - tcp.l4;
    let mut sum = if tcp.v6 {
        add_words(0, &frame[tcp.l3 + 8..tcp.l3 + 40])
    } else {
        add_words(0, &frame[tcp.l3 + 12..tcp.l3 + 20])
    };
    sum += u64::from(IPPROTO_TCP) + seg_len as u64;
    let check = tcp.l4 + 16;
    sum = add_words(sum, &frame[tcp.l4..check]);
    sum = add_words(sum, &frame[check + 2..]);
    !fold(sum)
}

/// Cut a TCP GSO frame into frames of at most `gso_size` payload bytes each, with full IP and
/// TCP checksums (Linux `tcp_gso_segment` rules: consecutive sequence numbers and IPv4 ids,
/// FIN and PSH on the last segment only, CWR on the first only). `alloc(len)` gives a zeroed
/// buffer of `reserve + len` bytes, and each segment is written after its first `reserve`
/// bytes and passed to `out`. `false` if the frame is not one [`validate`] would accept.
pub fn segment(
    frame: &[u8],
    gso_size: usize,
    reserve: usize,
    mut alloc: impl FnMut(usize) -> Vec<u8>,
    mut out: impl FnMut(Vec<u8>),
) -> bool {
    let Some(tcp) = parse_tcp(frame) else {
        return false;
    };
    let payload = &frame[tcp.payload..];
    if gso_size == 0 || payload.len().div_ceil(gso_size) > MAX_GSO_SEGS {
        return false;
    }
    let headers = &frame[..tcp.payload];
    let seq = u32::from_be_bytes([
        frame[tcp.l4 + 4],
        frame[tcp.l4 + 5],
        frame[tcp.l4 + 6],
        frame[tcp.l4 + 7],
    ]);
    let id = be16(frame, tcp.l3 + 4);
    let count = payload.len().div_ceil(gso_size).max(1);
    let chunks = payload.chunks(gso_size);
    let empty: [&[u8]; 1] = [&[]];
    let chunks: Box<dyn Iterator<Item = &[u8]>> = if payload.is_empty() {
        Box::new(empty.into_iter())
    } else {
        Box::new(chunks)
    };
    for (i, chunk) in chunks.enumerate() {
        let len = headers.len() + chunk.len();
        let mut buf = alloc(len);
        let seg = &mut buf[reserve..reserve + len];
        seg[..headers.len()].copy_from_slice(headers);
        seg[headers.len()..].copy_from_slice(chunk);
        if tcp.v6 {
            let plen = (len - tcp.l3 - 40) as u16;
            seg[tcp.l3 + 4..tcp.l3 + 6].copy_from_slice(&plen.to_be_bytes());
        } else {
            let tot = (len - tcp.l3) as u16;
            seg[tcp.l3 + 2..tcp.l3 + 4].copy_from_slice(&tot.to_be_bytes());
            let seg_id = id.wrapping_add(i as u16);
            seg[tcp.l3 + 4..tcp.l3 + 6].copy_from_slice(&seg_id.to_be_bytes());
            seg[tcp.l3 + 10..tcp.l3 + 12].fill(0);
            let ihl = tcp.l4 - tcp.l3;
            let check = !fold(add_words(0, &seg[tcp.l3..tcp.l3 + ihl]));
            seg[tcp.l3 + 10..tcp.l3 + 12].copy_from_slice(&check.to_be_bytes());
        }
        let seg_seq = seq.wrapping_add((i * gso_size) as u32);
        seg[tcp.l4 + 4..tcp.l4 + 8].copy_from_slice(&seg_seq.to_be_bytes());
        let flags = &mut seg[tcp.l4 + 13];
        if i + 1 < count {
            *flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            *flags &= !TCP_CWR;
        }
        let check = tcp_csum(seg, &tcp);
        seg[tcp.l4 + 16..tcp.l4 + 18].copy_from_slice(&check.to_be_bytes());
        out(buf);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071 the plain way, independent of `add_words`/`fold`: the ones'-complement sum of
    /// `data` (zero-padded), as u32 with end-around carry after every word.
    fn ones_sum(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        let mut i = 0;
        while i < data.len() {
            let hi = u32::from(data[i]);
            let lo = if i + 1 < data.len() {
                u32::from(data[i + 1])
            } else {
                0
            };
            sum += (hi << 8) | lo;
            if sum > 0xffff {
                sum -= 0xffff;
            }
            i += 2;
        }
        sum as u16
    }

    /// A TCP segment verifies when the sum over pseudo-header and segment is 0xffff.
    fn tcp_verifies(frame: &[u8], v6: bool, l3: usize, l4: usize) -> bool {
        let mut pseudo = Vec::new();
        if v6 {
            pseudo.extend_from_slice(&frame[l3 + 8..l3 + 40]);
            pseudo.extend_from_slice(&((frame.len() - l4) as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 6]);
        } else {
            pseudo.extend_from_slice(&frame[l3 + 12..l3 + 20]);
            pseudo.extend_from_slice(&[0, 6]);
            pseudo.extend_from_slice(&((frame.len() - l4) as u16).to_be_bytes());
        }
        pseudo.extend_from_slice(&frame[l4..]);
        ones_sum(&pseudo) == 0xffff
    }

    /// Ethernet + IPv4 (or IPv6) + TCP with a 20-byte (or 32-byte, with options) header and
    /// `payload`; the checksum field holds the pseudo-header sum, as a guest's NEEDS_CSUM.
    fn tcp_frame(v6: bool, tcp_options: usize, payload: &[u8], tcp_flags: u8) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
        let ip_len = if v6 { 40 } else { 20 };
        let tcp_len = 20 + tcp_options;
        if v6 {
            f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
            let mut ip = vec![0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&((tcp_len + payload.len()) as u16).to_be_bytes());
            ip[6] = 6;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            ip[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
            f.extend_from_slice(&ip);
        } else {
            f.extend_from_slice(&ETH_P_IP.to_be_bytes());
            let mut ip = vec![0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((ip_len + tcp_len + payload.len()) as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&0xfff0u16.to_be_bytes()); // id wraps within the test
            ip[6] = 0x40; // DF
            ip[8] = 64;
            ip[9] = 6;
            ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
            ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
            let c = !ones_sum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        let mut tcp = vec![0u8; tcp_len];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&0xffff_f000u32.to_be_bytes()); // seq wraps too
        tcp[12] = ((tcp_len / 4) as u8) << 4;
        tcp[13] = tcp_flags;
        tcp[14..16].copy_from_slice(&512u16.to_be_bytes());
        for (i, b) in tcp[20..].iter_mut().enumerate() {
            *b = if i % 4 == 0 { 1 } else { 0x5a }; // NOPs and junk, fine for the checksum
        }
        f.extend_from_slice(&tcp);
        f.extend_from_slice(payload);
        // Pseudo-header sum (not complemented) in the field, as Linux leaves it.
        let l3 = ETH_HLEN;
        let l4 = l3 + ip_len;
        let seg_len = f.len() - l4;
        let mut pseudo = Vec::new();
        if v6 {
            pseudo.extend_from_slice(&f[l3 + 8..l3 + 40]);
            pseudo.extend_from_slice(&(seg_len as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 6]);
        } else {
            pseudo.extend_from_slice(&f[l3 + 12..l3 + 20]);
            pseudo.extend_from_slice(&[0, 6]);
            pseudo.extend_from_slice(&(seg_len as u16).to_be_bytes());
        }
        let p = ones_sum(&pseudo);
        f[l4 + 16..l4 + 18].copy_from_slice(&p.to_be_bytes());
        f
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    const ALL: Offloads = Offloads {
        csum: true,
        tso4: true,
        tso6: true,
    };

    fn gso(v6: bool, gso_size: u16, frame: &[u8], tcp_options: usize) -> VnetHdr {
        let l4 = ETH_HLEN + if v6 { 40 } else { 20 };
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: (l4 + 20 + tcp_options).min(frame.len()) as u16,
            gso_size,
            csum_start: l4 as u16,
            csum_offset: 16,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 4,
            hdr_len: 0x1234,
            gso_size: 1448,
            csum_start: 54,
            csum_offset: 16,
        };
        let mut b = [0u8; 12];
        h.write(&mut b);
        assert_eq!(VnetHdr::parse(&b), h);
        assert_eq!(VnetHdr::parse(&b[..3]).hdr_len, 0x34);
    }

    #[test]
    fn complete_csum_matches_an_independent_sum() {
        for v6 in [false, true] {
            for n in [0, 1, 2, 3, 100, 1447, 1448] {
                let mut f = tcp_frame(v6, 0, &payload(n), 0x18);
                let l4 = ETH_HLEN + if v6 { 40 } else { 20 };
                assert!(complete_csum(&mut f, l4, 16));
                assert!(tcp_verifies(&f, v6, ETH_HLEN, l4), "v6={v6} n={n}");
            }
        }
        let mut short = vec![0u8; 20];
        assert!(!complete_csum(&mut short, 10, 9));
        assert!(short.iter().all(|&b| b == 0));
    }

    #[test]
    fn segments_verify_and_reassemble() {
        for v6 in [false, true] {
            for (n, mss, opts) in [
                (10_000, 1448, 12),
                (1448 * 3, 1448, 0),
                (1, 1448, 0),
                (65000, 8000, 0),
                (999, 7, 0),
            ] {
                let data = payload(n);
                let frame = tcp_frame(v6, opts, &data, 0x80 | 0x18 | 0x01); // CWR PSH FIN
                let hdr = gso(v6, mss, &frame, opts);
                let max = 65535;
                let ok = validate(&hdr, &frame, max, ALL).unwrap();
                let l3 = ETH_HLEN;
                let l4 = l3 + if v6 { 40 } else { 20 };
                let hl = l4 + 20 + opts;
                assert_eq!(usize::from(ok.hdr_len), hl);
                let mut segs = Vec::new();
                assert!(segment(
                    &frame,
                    usize::from(mss),
                    3,
                    |len| vec![0xee; 3 + len],
                    |s| segs.push(s)
                ));
                assert_eq!(segs.len(), n.div_ceil(usize::from(mss)));
                let mut joined = Vec::new();
                for (i, s) in segs.iter().enumerate() {
                    assert_eq!(&s[..3], &[0xee; 3], "reserve left alone");
                    let s = &s[3..];
                    assert!(s.len() - hl <= usize::from(mss));
                    assert_eq!(&s[..12], &frame[..12]);
                    assert!(tcp_verifies(s, v6, l3, l4), "segment {i} checksum");
                    if v6 {
                        assert_eq!(usize::from(be16(s, l3 + 4)), s.len() - l4);
                    } else {
                        assert_eq!(ones_sum(&s[l3..l4]), 0xffff, "IPv4 header checksum");
                        assert_eq!(usize::from(be16(s, l3 + 2)), s.len() - l3);
                        assert_eq!(be16(s, l3 + 4), 0xfff0u16.wrapping_add(i as u16));
                    }
                    let seq = u32::from_be_bytes(s[l4 + 4..l4 + 8].try_into().unwrap());
                    assert_eq!(
                        seq,
                        0xffff_f000u32.wrapping_add((i * usize::from(mss)) as u32)
                    );
                    let flags = s[l4 + 13];
                    let last = i + 1 == segs.len();
                    assert_eq!(flags & TCP_FIN != 0, last);
                    assert_eq!(flags & TCP_PSH != 0, last);
                    assert_eq!(flags & TCP_CWR != 0, i == 0);
                    assert_eq!(&s[l4 + 20..hl], &frame[l4 + 20..hl], "options copied");
                    joined.extend_from_slice(&s[hl..]);
                }
                assert_eq!(joined, data);
            }
        }
    }

    #[test]
    fn validate_refuses_what_was_not_offered() {
        let frame = tcp_frame(false, 0, &payload(3000), 0x10);
        let hdr = gso(false, 1448, &frame, 0);
        let none = Offloads::default();
        let csum_only = Offloads::new(true, false, false);
        assert_eq!(validate(&hdr, &frame, 1514, none), Err(HdrError::Flags));
        assert_eq!(
            validate(&hdr, &frame, 1514, csum_only),
            Err(HdrError::GsoType)
        );
        assert!(validate(&hdr, &frame, 1514, ALL).is_ok());
        // TSO without CSUM is not a combination.
        assert_eq!(Offloads::new(false, true, true), none);
        // A v4 header with a TCPV6 gso_type.
        let lie = VnetHdr {
            gso_type: GSO_TCPV6,
            ..hdr
        };
        assert_eq!(validate(&lie, &frame, 1514, ALL), Err(HdrError::Headers));
        for (flags, gso_type) in [(2, 0), (4, 0), (0x81, 0), (1, 3), (1, 5), (1, 0x81), (0, 1)] {
            let bad = VnetHdr {
                flags,
                gso_type,
                ..hdr
            };
            assert!(
                validate(&bad, &frame, 1514, ALL).is_err(),
                "{flags} {gso_type}"
            );
        }
    }

    #[test]
    fn validate_bounds_every_field() {
        let frame = tcp_frame(false, 0, &payload(3000), 0x10);
        let len = frame.len();
        let hdr = gso(false, 1448, &frame, 0);
        let max = 1514;
        let csum = |start: u16, offset: u16| VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: start,
            csum_offset: offset,
            ..VnetHdr::default()
        };
        let small = tcp_frame(false, 0, &payload(100), 0x10);
        assert!(validate(&csum(34, 16), &small, max, ALL).is_ok());
        let end = small.len() as u16;
        assert!(validate(&csum(end - 2, 0), &small, max, ALL).is_ok());
        for (s, o) in [
            (end - 1, 0),
            (end, 0),
            (34, end),
            (u16::MAX, u16::MAX),
            (0, u16::MAX),
        ] {
            assert_eq!(
                validate(&csum(s, o), &small, max, ALL),
                Err(HdrError::CsumRange)
            );
        }
        // Over the MTU without GSO.
        assert_eq!(
            validate(&VnetHdr::default(), &frame, max, ALL),
            Err(HdrError::TooLong)
        );
        assert!(validate(&VnetHdr::default(), &frame, len, ALL).is_ok());
        // Lying gso_size: zero, segments over the MTU, too many segments.
        for size in [0, 1461, 1500, u16::MAX] {
            let bad = VnetHdr {
                gso_size: size,
                ..hdr
            };
            assert_eq!(
                validate(&bad, &frame, max, ALL),
                Err(HdrError::GsoSize),
                "{size}"
            );
        }
        let ok = VnetHdr {
            gso_size: 1460,
            ..hdr
        };
        assert!(validate(&ok, &frame, max, ALL).is_ok());
        let big = tcp_frame(false, 0, &payload(60_000), 0x10);
        let tiny = VnetHdr {
            gso_size: 8,
            ..gso(false, 8, &big, 0)
        };
        assert_eq!(validate(&tiny, &big, max, ALL), Err(HdrError::GsoSize));
        // hdr_len beyond the frame; a wrong csum_start for GSO.
        let bad = VnetHdr {
            hdr_len: len as u16 + 1,
            ..hdr
        };
        assert_eq!(validate(&bad, &frame, max, ALL), Err(HdrError::HdrLen));
        let bad = VnetHdr {
            csum_start: 30,
            ..hdr
        };
        assert_eq!(validate(&bad, &frame, max, ALL), Err(HdrError::Headers));
        // Not TCP, truncated headers, IPv4 fragment.
        let mut udp = frame.clone();
        udp[ETH_HLEN + 9] = 17;
        assert_eq!(validate(&hdr, &udp, max, ALL), Err(HdrError::Headers));
        let mut frag = frame.clone();
        frag[ETH_HLEN + 6] = 0x20;
        assert_eq!(validate(&hdr, &frag, max, ALL), Err(HdrError::Headers));
        let cut = &frame[..40];
        let h = VnetHdr { hdr_len: 0, ..hdr };
        assert!(validate(&h, cut, max, ALL).is_err());
    }

    #[test]
    fn rx_action_follows_the_guest() {
        let gso4 = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            ..VnetHdr::default()
        };
        let csum = VnetHdr {
            flags: F_NEEDS_CSUM,
            ..VnetHdr::default()
        };
        assert_eq!(rx_action(&gso4, ALL), RxAction::Pass(gso4));
        assert_eq!(
            rx_action(&gso4, Offloads::new(true, false, true)),
            RxAction::Segment
        );
        assert_eq!(rx_action(&csum, Offloads::default()), RxAction::Checksum);
        let valid = VnetHdr {
            flags: F_DATA_VALID,
            ..VnetHdr::default()
        };
        assert_eq!(
            rx_action(&valid, Offloads::default()),
            RxAction::Pass(VnetHdr::default())
        );
    }

    proptest::proptest! {
        /// Whatever the guest writes, validation and segmentation never panic, and what
        /// validation accepts segments into frames within the limit.
        #[test]
        fn hostile_headers_never_panic(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 10),
            n in 0usize..4000,
            max in 60usize..9000,
            v6 in proptest::prelude::any::<bool>(),
            mangle in proptest::collection::vec((0usize..80, proptest::prelude::any::<u8>()), 0..4),
        ) {
            let mut frame = tcp_frame(v6, 0, &payload(n), 0x18);
            for (i, b) in mangle {
                if i < frame.len() {
                    frame[i] = b;
                }
            }
            let hdr = VnetHdr::parse(&raw);
            if let Ok(ok) = validate(&hdr, &frame, max, ALL) {
                if ok.gso_type != GSO_NONE {
                    let mut segs = 0;
                    let size = usize::from(ok.gso_size);
                    let mut longest = 0;
                    let cut = segment(&frame, size, 0, |l| vec![0; l], |s| {
                        longest = longest.max(s.len());
                        segs += 1;
                    });
                    proptest::prop_assert!(cut);
                    proptest::prop_assert!(longest <= max);
                    proptest::prop_assert!(segs <= MAX_GSO_SEGS);
                } else {
                    proptest::prop_assert!(frame.len() <= max);
                }
                if ok.flags & F_NEEDS_CSUM != 0 {
                    let mut f = frame.clone();
                    let (s, o) = (usize::from(ok.csum_start), usize::from(ok.csum_offset));
                    proptest::prop_assert!(complete_csum(&mut f, s, o));
                }
            }
        }
    }
}
