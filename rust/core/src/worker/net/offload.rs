//! virtio-net header offloads (virtio 1.2 §5.1.6.2 and §5.1.6.4): checking what a guest asks
//! for on transmit, and doing the work in software for a receiver that did not negotiate it.
//!
//! A transmitted packet may carry a partial checksum (`VIRTIO_NET_HDR_F_NEEDS_CSUM` with
//! `csum_start`/`csum_offset`, feature CSUM) and be a segmentation job with `gso_size`: TCP
//! (`gso_type` TCPV4/TCPV6, features HOST_TSO4/6), UDP segmentation (USO, `GSO_UDP_L4` over
//! IPv4 or IPv6, HOST_USO) or UDP fragmentation (UFO, `GSO_UDP`, HOST_UFO). [`validate`]
//! refuses anything the guest was not offered or that does not fit the frame; for GSO it
//! parses the Ethernet, IP and TCP/UDP headers itself (`hdr_len` from a guest is only a hint,
//! and Linux sends the linear length there), requires `csum_start`/`csum_offset` to point at
//! the TCP/UDP checksum, and refuses segments (fragments) longer than the port's frame limit
//! and more than [`MAX_GSO_SEGS`] of them. The header travels with the frame through the
//! switch; at the receiving port [`complete_csum`] and [`segment_gso`] ([`segment`],
//! [`segment_udp`], [`fragment_udp`]) do what the receiving guest did not offer to do
//! (GUEST_CSUM, GUEST_TSO4/6, GUEST_USO4/6, GUEST_UFO).

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
/// `gso_type`: UDP fragmentation (UFO): the datagram is cut into IP fragments.
pub const GSO_UDP: u8 = 3;
/// `gso_type`: UDP segmentation (USO), over IPv4 or IPv6: the payload is cut into datagrams.
pub const GSO_UDP_L4: u8 = 5;
/// Most segments one GSO packet may be cut into (a 64 KiB packet at a 1448-byte MSS is 46).
pub const MAX_GSO_SEGS: usize = 1024;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_FRAGMENT: u8 = 44;
const UDP_HLEN: usize = 8;
/// Bytes of an IPv6 fragment header.
const FRAG_HLEN: usize = 8;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Which offloads one direction has: what the device accepts from the guest (CSUM,
/// HOST_TSO4/6, HOST_UFO, HOST_USO) or what the guest accepts from the device (GUEST_CSUM,
/// GUEST_TSO4/6, GUEST_UFO, GUEST_USO4/6).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Partial checksums.
    pub csum: bool,
    /// TCP segmentation over IPv4 (only with `csum`).
    pub tso4: bool,
    /// TCP segmentation over IPv6 (only with `csum`).
    pub tso6: bool,
    /// UDP fragmentation, IPv4 and IPv6 (only with `csum`).
    pub ufo: bool,
    /// UDP segmentation over IPv4 (only with `csum`; HOST_USO is both `uso4` and `uso6`).
    pub uso4: bool,
    /// UDP segmentation over IPv6 (only with `csum`).
    pub uso6: bool,
}

impl Offloads {
    /// No offload.
    pub const NONE: Self = Self {
        csum: false,
        tso4: false,
        tso6: false,
        ufo: false,
        uso4: false,
        uso6: false,
    };

    /// Every offload.
    pub const ALL: Self = Self {
        csum: true,
        tso4: true,
        tso6: true,
        ufo: true,
        uso4: true,
        uso6: true,
    };

    /// From the three feature bits; TSO without checksum offload is not a valid combination
    /// (§5.1.3.1) and counts as no TSO.
    pub fn new(csum: bool, tso4: bool, tso6: bool) -> Self {
        Self {
            csum,
            tso4: csum && tso4,
            tso6: csum && tso6,
            ..Self::NONE
        }
    }

    /// These offloads and the UDP ones (UFO, USO over IPv4 and IPv6), which need `csum` too.
    pub fn with_udp(self, ufo: bool, uso4: bool, uso6: bool) -> Self {
        Self {
            ufo: self.csum && ufo,
            uso4: self.csum && uso4,
            uso6: self.csum && uso6,
            ..self
        }
    }

    /// Whether a packet with this header (and `frame`, for USO's IP version) can go to the
    /// guest as is.
    fn takes(&self, hdr: &VnetHdr, frame: &[u8]) -> bool {
        let csum_ok = hdr.flags & F_NEEDS_CSUM == 0 || self.csum;
        let gso_ok = match hdr.gso_type {
            GSO_NONE => true,
            GSO_TCPV4 => self.tso4,
            GSO_TCPV6 => self.tso6,
            GSO_UDP => self.ufo,
            GSO_UDP_L4 => match l3(frame) {
                Some((_, ETH_P_IPV6)) => self.uso6,
                _ => self.uso4,
            },
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
    #[inline]
    pub fn parse(b: &[u8]) -> Self {
        let raw: [u8; VNET_HDR_FIELDS] = match b.first_chunk() {
            Some(whole) => *whole,
            None => {
                let mut raw = [0u8; VNET_HDR_FIELDS];
                raw[..b.len()].copy_from_slice(b);
                raw
            }
        };
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
    #[inline]
    pub fn write(&self, b: &mut [u8]) {
        // One bounds check and one 10-byte store instead of six checked pieces.
        let [h0, h1] = self.hdr_len.to_le_bytes();
        let [s0, s1] = self.gso_size.to_le_bytes();
        let [c0, c1] = self.csum_start.to_le_bytes();
        let [o0, o1] = self.csum_offset.to_le_bytes();
        b[..VNET_HDR_FIELDS].copy_from_slice(&[
            self.flags,
            self.gso_type,
            h0,
            h1,
            s0,
            s1,
            c0,
            c1,
            o0,
            o1,
        ]);
    }
}

/// Why a header from the guest was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HdrError {
    /// A flag other than NEEDS_CSUM, or NEEDS_CSUM without CSUM negotiated.
    Flags,
    /// A `gso_type` not offered (ECN, unknown, TSO/UFO/USO not negotiated for that IP
    /// version), or GSO without NEEDS_CSUM.
    GsoType,
    /// `csum_start`/`csum_offset` point outside the frame.
    CsumRange,
    /// `hdr_len` is larger than the frame.
    HdrLen,
    /// A GSO frame whose headers are not Ethernet, IPv4/IPv6 and TCP or UDP as `gso_type`
    /// says, an IPv4 fragment, `csum_start`/`csum_offset` not at the TCP/UDP checksum, or
    /// UFO over IPv4 with options.
    Headers,
    /// `gso_size` 0 (UFO: under 8), a segment or fragment longer than the frame limit, or more
    /// than [`MAX_GSO_SEGS`] of them.
    GsoSize,
    /// A frame over the limit without GSO.
    TooLong,
}

/// Where the headers of a TCP or UDP frame end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct L4Frame {
    /// Start of the IP header.
    l3: usize,
    /// Start of the TCP or UDP header.
    l4: usize,
    /// Start of the payload (end of the headers).
    payload: usize,
    v6: bool,
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

/// Where the Ethernet header (with one optional VLAN tag) ends, and the ethertype.
fn l3(frame: &[u8]) -> Option<(usize, u16)> {
    let ethertype = be16(frame.get(..ETH_HLEN)?, 12);
    if ethertype == ETH_P_8021Q {
        return Some((ETH_HLEN + 4, be16(frame.get(..ETH_HLEN + 4)?, 16)));
    }
    Some((ETH_HLEN, ethertype))
}

/// Parse Ethernet (one optional VLAN tag) and IPv4 (not a fragment) or IPv6 (no extension
/// headers) carrying `proto`: (start of the IP header, start of the `proto` header, IPv6).
fn parse_ip(frame: &[u8], proto: u8) -> Option<(usize, usize, bool)> {
    let (l3, ethertype) = l3(frame)?;
    match ethertype {
        ETH_P_IP => {
            let ip = frame.get(l3..l3 + 20)?;
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let frag = be16(ip, 6) & 0x3fff; // MF and the fragment offset
            if ip[0] >> 4 != 4 || ihl < 20 || ip[9] != proto || frag != 0 {
                return None;
            }
            Some((l3, l3 + ihl, false))
        }
        ETH_P_IPV6 => {
            let ip = frame.get(l3..l3 + 40)?;
            if ip[0] >> 4 != 6 || ip[6] != proto {
                return None;
            }
            Some((l3, l3 + 40, true))
        }
        _ => None,
    }
}

/// Parse Ethernet, IPv4 or IPv6 (see [`parse_ip`]) and TCP.
fn parse_tcp(frame: &[u8]) -> Option<L4Frame> {
    let (l3, l4, v6) = parse_ip(frame, IPPROTO_TCP)?;
    let doff = usize::from(frame.get(l4 + 12)? >> 4) * 4;
    if doff < 20 || l4 + doff > frame.len() {
        return None;
    }
    Some(L4Frame {
        l3,
        l4,
        payload: l4 + doff,
        v6,
    })
}

/// Parse Ethernet, IPv4 or IPv6 (see [`parse_ip`]) and UDP.
fn parse_udp(frame: &[u8]) -> Option<L4Frame> {
    let (l3, l4, v6) = parse_ip(frame, IPPROTO_UDP)?;
    if l4 + UDP_HLEN > frame.len() {
        return None;
    }
    Some(L4Frame {
        l3,
        l4,
        payload: l4 + UDP_HLEN,
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

/// [`validate`] of the header whose bytes are `raw` (as [`VnetHdr::parse`] reads them), for
/// `frame`. `Ok(None)`: the header to carry is all zeros because `raw` is a plain header (no
/// flag, no GSO: what a guest sends without offloads), which only needs the frame length
/// checked and is told apart from the rest by its first two bytes, without parsing the fields
/// (which it ignores, as [`validate`] does). Any other header goes through [`validate`].
#[inline]
pub fn validate_raw(
    raw: &[u8],
    frame: &[u8],
    max_frame: usize,
    allowed: Offloads,
) -> Result<Option<VnetHdr>, HdrError> {
    match check_plain(raw, frame.len(), max_frame) {
        Some(verdict) => verdict.map(|()| None),
        None => validate(&VnetHdr::parse(raw), frame, max_frame, allowed).map(Some),
    }
}

/// The fast path of [`validate_raw`] for a frame of `len` bytes: `None` if `raw` is not a
/// plain header (validate it in full), else the verdict ([`HdrError::TooLong`] over
/// `max_frame`), which needs none of the frame's bytes.
#[inline]
pub fn check_plain(raw: &[u8], len: usize, max_frame: usize) -> Option<Result<(), HdrError>> {
    if !is_plain(raw) {
        None
    } else if len > max_frame {
        Some(Err(HdrError::TooLong))
    } else {
        Some(Ok(()))
    }
}

/// `raw` (a header's bytes, as [`VnetHdr::parse`] reads them) is a plain header: no flag, no
/// GSO, what a guest sends without offloads and what goes to a guest unchanged. Its other
/// fields mean nothing then.
#[inline]
pub fn is_plain(raw: &[u8]) -> bool {
    raw.first_chunk() == Some(&[0, GSO_NONE])
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
    let want_v6 = match hdr.gso_type {
        GSO_NONE => {
            return if len > max_frame {
                Err(HdrError::TooLong)
            } else {
                Ok(out)
            };
        }
        GSO_TCPV4 if allowed.tso4 => Some(false),
        GSO_TCPV6 if allowed.tso6 => Some(true),
        GSO_UDP if allowed.ufo => None,
        GSO_UDP_L4 if allowed.uso4 || allowed.uso6 => None,
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
    let udp = matches!(hdr.gso_type, GSO_UDP | GSO_UDP_L4);
    let (parsed, csum_offset) = if udp {
        (parse_udp(frame), 6)
    } else {
        (parse_tcp(frame), 16)
    };
    let l4 = parsed.ok_or(HdrError::Headers)?;
    if want_v6.is_some_and(|v6| v6 != l4.v6)
        || usize::from(hdr.csum_start) != l4.l4
        || hdr.csum_offset != csum_offset
        // UFO over IPv4 without options: only some options may be copied into fragments.
        || (hdr.gso_type == GSO_UDP && !l4.v6 && l4.l4 - l4.l3 != 20)
    {
        return Err(HdrError::Headers);
    }
    if hdr.gso_type == GSO_UDP_L4 && !(if l4.v6 { allowed.uso6 } else { allowed.uso4 }) {
        return Err(HdrError::GsoType);
    }
    let gso_size = usize::from(hdr.gso_size);
    let fits = if hdr.gso_type == GSO_UDP {
        // UFO: fragments of gso_size bytes of IP payload, rounded down to 8 (the fragment
        // offset unit); IPv6 adds a fragment header to each.
        let frag = gso_size & !7;
        let extra = if l4.v6 { FRAG_HLEN } else { 0 };
        frag > 0
            && l4.l4 + extra + frag <= max_frame
            && (len - l4.l4).div_ceil(frag) <= MAX_GSO_SEGS
    } else {
        gso_size > 0
            && l4.payload + gso_size <= max_frame
            && (len - l4.payload).div_ceil(gso_size) <= MAX_GSO_SEGS
    };
    if !fits {
        return Err(HdrError::GsoSize);
    }
    out.gso_type = hdr.gso_type;
    out.gso_size = hdr.gso_size;
    out.hdr_len = l4.payload as u16;
    Ok(out)
}

/// What a receiving guest should get for a packet with `hdr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxAction {
    /// Deliver with this header (NEEDS_CSUM and GSO as the guest takes them).
    Pass(VnetHdr),
    /// Complete the checksum in software ([`complete_csum`]), then deliver with flags 0.
    Checksum,
    /// Cut into segments or fragments in software ([`segment_gso`]).
    Segment,
}

/// Decide for a packet (header already validated, `frame` its frame) and a receiver with
/// `guest` offloads.
pub fn rx_action(hdr: &VnetHdr, frame: &[u8], guest: Offloads) -> RxAction {
    if guest.takes(hdr, frame) {
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
    let csum = finish(add_words(0, &frame[start..]));
    frame[field..field + 2].copy_from_slice(&csum.to_be_bytes());
    true
}

/// The checksum to send for a ones'-complement `sum`: its complement, with a computed 0 sent
/// as 0xffff (RFC 768: 0 means "no checksum" in UDP; the same number in ones' complement for
/// TCP and IP, as Linux's `CSUM_MANGLED_0`).
fn finish(sum: u64) -> u16 {
    match !fold(sum) {
        0 => 0xffff,
        c => c,
    }
}

/// The sum of the TCP/UDP pseudo-header: `frame`'s IP addresses, `proto` and `len`.
fn pseudo_sum(frame: &[u8], hdrs: &L4Frame, proto: u8, len: usize) -> u64 {
    let addrs = if hdrs.v6 {
        &frame[hdrs.l3 + 8..hdrs.l3 + 40]
    } else {
        &frame[hdrs.l3 + 12..hdrs.l3 + 20]
    };
    add_words(0, addrs) + u64::from(proto) + len as u64
}

/// The TCP or UDP (`proto`) checksum of `frame[hdrs.l4..]` with its pseudo-header; the field
/// `check` bytes into the L4 header counts as zero.
fn l4_csum(frame: &[u8], hdrs: &L4Frame, proto: u8, check: usize) -> u16 {
    let mut sum = pseudo_sum(frame, hdrs, proto, frame.len() - hdrs.l4);
    let at = hdrs.l4 + check;
    sum = add_words(sum, &frame[hdrs.l4..at]);
    sum = add_words(sum, &frame[at + 2..]);
    finish(sum)
}

/// The IPv4 header checksum of the `ihl`-byte header at `l3` (its field counted as zero).
fn set_ipv4_check(seg: &mut [u8], l3: usize, ihl: usize) {
    seg[l3 + 10..l3 + 12].fill(0);
    let check = !fold(add_words(0, &seg[l3..l3 + ihl]));
    seg[l3 + 10..l3 + 12].copy_from_slice(&check.to_be_bytes());
}

/// Fix the IP header of a segment (`hdrs` as in the packet it was cut from) for its length:
/// IPv6 payload length; IPv4 total length, `id` and the header checksum.
fn set_ip_lengths(seg: &mut [u8], hdrs: &L4Frame, id: u16) {
    let l3 = hdrs.l3;
    if hdrs.v6 {
        let plen = (seg.len() - l3 - 40) as u16;
        seg[l3 + 4..l3 + 6].copy_from_slice(&plen.to_be_bytes());
    } else {
        let tot = (seg.len() - l3) as u16;
        seg[l3 + 2..l3 + 4].copy_from_slice(&tot.to_be_bytes());
        seg[l3 + 4..l3 + 6].copy_from_slice(&id.to_be_bytes());
        set_ipv4_check(seg, l3, hdrs.l4 - l3);
    }
}

/// `payload` in pieces of `size` bytes; an empty payload is one empty piece.
fn pieces(payload: &[u8], size: usize) -> impl Iterator<Item = &[u8]> {
    let empty = payload.is_empty().then_some(payload);
    payload.chunks(size).chain(empty)
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
    alloc: impl FnMut(usize) -> Vec<u8>,
    out: impl FnMut(Vec<u8>),
) -> bool {
    let Some(tcp) = parse_tcp(frame) else {
        return false;
    };
    let seq = u32::from_be_bytes([
        frame[tcp.l4 + 4],
        frame[tcp.l4 + 5],
        frame[tcp.l4 + 6],
        frame[tcp.l4 + 7],
    ]);
    let count = (frame.len() - tcp.payload).div_ceil(gso_size.max(1)).max(1);
    cut_payload(frame, &tcp, gso_size, reserve, alloc, out, |seg, i, _| {
        let seg_seq = seq.wrapping_add((i * gso_size) as u32);
        seg[tcp.l4 + 4..tcp.l4 + 8].copy_from_slice(&seg_seq.to_be_bytes());
        let flags = &mut seg[tcp.l4 + 13];
        if i + 1 < count {
            *flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            *flags &= !TCP_CWR;
        }
        let check = l4_csum(seg, &tcp, IPPROTO_TCP, 16);
        seg[tcp.l4 + 16..tcp.l4 + 18].copy_from_slice(&check.to_be_bytes());
    })
}

/// What [`segment`] and [`segment_udp`] share: the L4 payload of `frame` (parsed as `l4`) cut
/// into pieces of at most `gso_size` bytes, each after a copy of all the headers with its IP
/// lengths and (IPv4) consecutive id set; `finish(segment, index, piece length)` completes the
/// L4 header. `false` (nothing made) for a `gso_size` of 0 or more than [`MAX_GSO_SEGS`]
/// pieces.
fn cut_payload(
    frame: &[u8],
    l4: &L4Frame,
    gso_size: usize,
    reserve: usize,
    mut alloc: impl FnMut(usize) -> Vec<u8>,
    mut out: impl FnMut(Vec<u8>),
    mut finish: impl FnMut(&mut [u8], usize, usize),
) -> bool {
    let payload = &frame[l4.payload..];
    if gso_size == 0 || payload.len().div_ceil(gso_size) > MAX_GSO_SEGS {
        return false;
    }
    let headers = &frame[..l4.payload];
    let id = be16(frame, l4.l3 + 4);
    for (i, chunk) in pieces(payload, gso_size).enumerate() {
        let len = headers.len() + chunk.len();
        let mut buf = alloc(len);
        let seg = &mut buf[reserve..reserve + len];
        seg[..headers.len()].copy_from_slice(headers);
        seg[headers.len()..].copy_from_slice(chunk);
        set_ip_lengths(seg, l4, id.wrapping_add(i as u16));
        finish(seg, i, chunk.len());
        out(buf);
    }
    true
}

/// Cut a USO (`GSO_UDP_L4`) frame into UDP datagrams of at most `gso_size` payload bytes each,
/// with full IP and UDP checksums (Linux `__udp_gso_segment`: each a datagram of its own,
/// consecutive IPv4 ids). `alloc`, `reserve` and `out` as for [`segment`]. `false` if the
/// frame is not UDP over IPv4/IPv6 or would make more than [`MAX_GSO_SEGS`] datagrams.
pub fn segment_udp(
    frame: &[u8],
    gso_size: usize,
    reserve: usize,
    alloc: impl FnMut(usize) -> Vec<u8>,
    out: impl FnMut(Vec<u8>),
) -> bool {
    let Some(udp) = parse_udp(frame) else {
        return false;
    };
    cut_payload(
        frame,
        &udp,
        gso_size,
        reserve,
        alloc,
        out,
        |seg, _, piece| {
            let udp_len = (UDP_HLEN + piece) as u16;
            seg[udp.l4 + 4..udp.l4 + 6].copy_from_slice(&udp_len.to_be_bytes());
            let check = l4_csum(seg, &udp, IPPROTO_UDP, 6);
            seg[udp.l4 + 6..udp.l4 + 8].copy_from_slice(&check.to_be_bytes());
        },
    )
}

/// An identification for the fragments of one IPv6 datagram: a counter from a random start
/// (per process), so that ids are neither repeated soon nor guessable from outside.
fn next_frag_id() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        AtomicU32::new(seed as u32)
    });
    next.fetch_add(1, Ordering::Relaxed)
}

/// Cut a UFO (`GSO_UDP`) frame into IP fragments of at most `gso_size` bytes of IP payload
/// each (rounded down to a multiple of 8), as Linux's UFO did: the UDP checksum is computed
/// over the whole datagram (which the receiver reassembles), the first fragment carries the
/// UDP header; IPv4 fragments share the packet's id and have DF cleared, IPv6 fragments get a
/// fragment header with a fresh identification. `alloc`, `reserve` and `out` as for
/// [`segment`]. `false` if the frame is not UDP over IPv4 (without options) or IPv6, or
/// would make more than [`MAX_GSO_SEGS`] fragments.
pub fn fragment_udp(
    frame: &[u8],
    gso_size: usize,
    reserve: usize,
    mut alloc: impl FnMut(usize) -> Vec<u8>,
    mut out: impl FnMut(Vec<u8>),
) -> bool {
    let Some(udp) = parse_udp(frame) else {
        return false;
    };
    let frag = gso_size & !7;
    let data = &frame[udp.l4..]; // the IP payload: UDP header and payload
    if frag == 0 || data.len().div_ceil(frag) > MAX_GSO_SEGS || (!udp.v6 && udp.l4 - udp.l3 != 20) {
        return false;
    }
    let mut udp_hdr = [0u8; UDP_HLEN];
    udp_hdr[..6].copy_from_slice(&data[..6]);
    udp_hdr[4..6].copy_from_slice(&(data.len() as u16).to_be_bytes());
    let mut sum = pseudo_sum(frame, &udp, IPPROTO_UDP, data.len());
    sum = add_words(sum, &udp_hdr);
    sum = add_words(sum, &data[UDP_HLEN..]);
    udp_hdr[6..].copy_from_slice(&finish(sum).to_be_bytes());
    let ident = if udp.v6 { next_frag_id() } else { 0 };
    let hlen = udp.l4 + if udp.v6 { FRAG_HLEN } else { 0 };
    let count = data.len().div_ceil(frag);
    let l3 = udp.l3;
    for (i, piece) in data.chunks(frag).enumerate() {
        let offset = (i * frag) as u16; // a multiple of 8 below 65536
        let more = i + 1 < count;
        let len = hlen + piece.len();
        let mut buf = alloc(len);
        let seg = &mut buf[reserve..reserve + len];
        seg[..udp.l4].copy_from_slice(&frame[..udp.l4]);
        seg[hlen..].copy_from_slice(piece);
        if i == 0 {
            seg[hlen..hlen + UDP_HLEN].copy_from_slice(&udp_hdr);
        }
        if udp.v6 {
            let plen = (len - l3 - 40) as u16;
            seg[l3 + 4..l3 + 6].copy_from_slice(&plen.to_be_bytes());
            seg[l3 + 6] = IPPROTO_FRAGMENT;
            let fh = &mut seg[udp.l4..hlen];
            fh[0] = IPPROTO_UDP;
            fh[1] = 0;
            fh[2..4].copy_from_slice(&(offset | u16::from(more)).to_be_bytes());
            fh[4..8].copy_from_slice(&ident.to_be_bytes());
        } else {
            let tot = (len - l3) as u16;
            seg[l3 + 2..l3 + 4].copy_from_slice(&tot.to_be_bytes());
            let frag_off = (offset >> 3) | if more { 0x2000 } else { 0 }; // MF; DF cleared
            seg[l3 + 6..l3 + 8].copy_from_slice(&frag_off.to_be_bytes());
            set_ipv4_check(seg, l3, 20);
        }
        out(buf);
    }
    true
}

/// Do a GSO packet's segmentation in software, as its `gso_type` says: [`segment`] (TCP),
/// [`segment_udp`] (USO) or [`fragment_udp`] (UFO). `false` for anything else.
pub fn segment_gso(
    frame: &[u8],
    hdr: &VnetHdr,
    reserve: usize,
    alloc: impl FnMut(usize) -> Vec<u8>,
    out: impl FnMut(Vec<u8>),
) -> bool {
    let size = usize::from(hdr.gso_size);
    match hdr.gso_type {
        GSO_TCPV4 | GSO_TCPV6 => segment(frame, size, reserve, alloc, out),
        GSO_UDP_L4 => segment_udp(frame, size, reserve, alloc, out),
        GSO_UDP => fragment_udp(frame, size, reserve, alloc, out),
        _ => false,
    }
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

    const ALL: Offloads = Offloads::ALL;

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
    fn validate_raw_refuses_and_carries_exactly_what_validate_does() {
        // Every header of a grid of flags, GSO types and fields (good, zero and garbage), in
        // every length a guest's header can be cut to, against TCP and UDP frames, offers and
        // frame limits: the plain-header fast path must give what parsing and validate give.
        let frames = [
            tcp_frame(false, 0, &payload(3000), 0x18),
            tcp_frame(true, 12, &payload(100), 0x18),
            udp_frame(false, &payload(2000)),
            udp_frame(true, &payload(60)),
            vec![0xff; 64],
        ];
        let offers = [
            Offloads::NONE,
            Offloads::new(true, false, false),
            Offloads::new(true, true, false),
            ALL,
        ];
        let mut plain = 0;
        for frame in &frames {
            for flags in [0, F_NEEDS_CSUM, F_DATA_VALID, 0x80, 0xff] {
                for gso_type in [
                    GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4, 0x80, 0x81,
                ] {
                    for fields in [
                        [0u16; 4],
                        [54, 1448, 34, 16],
                        [54, 1448, 34, 6],
                        [0xffff; 4],
                    ] {
                        let hdr = VnetHdr {
                            flags,
                            gso_type,
                            hdr_len: fields[0],
                            gso_size: fields[1],
                            csum_start: fields[2],
                            csum_offset: fields[3],
                        };
                        // 12 bytes: num_buffers after the fields, garbage on transmit.
                        let mut raw = [0x5a_u8; 12];
                        hdr.write(&mut raw);
                        for cut in [0, 1, 2, 3, 10, 12] {
                            let raw = &raw[..cut];
                            for max in [frame.len() - 1, frame.len(), 1514, 65535] {
                                for allowed in offers {
                                    let fast = validate_raw(raw, frame, max, allowed);
                                    let full = validate(&VnetHdr::parse(raw), frame, max, allowed);
                                    match fast {
                                        Ok(None) => {
                                            plain += 1;
                                            assert_eq!(full, Ok(VnetHdr::default()), "{raw:?}");
                                        }
                                        Ok(Some(carried)) => assert_eq!(full, Ok(carried)),
                                        Err(e) => assert_eq!(full, Err(e), "{raw:?} {max}"),
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        // The fast path was taken (plain headers whose frame fits), refusing the rest.
        assert!(plain > 0);
        let frame = &frames[0];
        let garbage = [0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 7, 7];
        assert_eq!(
            validate_raw(&garbage, frame, 65535, Offloads::NONE),
            Ok(None)
        );
        assert_eq!(
            validate_raw(&garbage, frame, frame.len() - 1, ALL),
            Err(HdrError::TooLong)
        );
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
        assert_eq!(rx_action(&gso4, &[], ALL), RxAction::Pass(gso4));
        assert_eq!(
            rx_action(&gso4, &[], Offloads::new(true, false, true)),
            RxAction::Segment
        );
        assert_eq!(
            rx_action(&csum, &[], Offloads::default()),
            RxAction::Checksum
        );
        let valid = VnetHdr {
            flags: F_DATA_VALID,
            ..VnetHdr::default()
        };
        assert_eq!(
            rx_action(&valid, &[], Offloads::default()),
            RxAction::Pass(VnetHdr::default())
        );
    }

    /// Ethernet + IPv4 (DF, id 0x1234) or IPv6 + UDP with `payload`; the checksum field holds
    /// the pseudo-header sum over the whole datagram, as a guest's NEEDS_CSUM.
    fn udp_frame(v6: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
        let udp_len = (UDP_HLEN + payload.len()) as u16;
        if v6 {
            f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
            let mut ip = vec![0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&udp_len.to_be_bytes());
            ip[6] = IPPROTO_UDP;
            ip[7] = 64;
            ip[8] = 0xfd;
            ip[23] = 1;
            ip[24] = 0xfd;
            ip[39] = 2;
            f.extend_from_slice(&ip);
        } else {
            f.extend_from_slice(&ETH_P_IP.to_be_bytes());
            let mut ip = vec![0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
            ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
            ip[6] = 0x40; // DF
            ip[8] = 64;
            ip[9] = IPPROTO_UDP;
            ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
            ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
            let c = !ones_sum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        let l4 = f.len();
        f.extend_from_slice(&4433u16.to_be_bytes());
        f.extend_from_slice(&53u16.to_be_bytes());
        f.extend_from_slice(&udp_len.to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        let p = ones_sum(&udp_pseudo(&f, v6, ETH_HLEN, udp_len));
        f[l4 + 6..l4 + 8].copy_from_slice(&p.to_be_bytes());
        f
    }

    fn udp_pseudo(f: &[u8], v6: bool, l3: usize, len: u16) -> Vec<u8> {
        let mut pseudo = Vec::new();
        if v6 {
            pseudo.extend_from_slice(&f[l3 + 8..l3 + 40]);
            pseudo.extend_from_slice(&u32::from(len).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 17]);
        } else {
            pseudo.extend_from_slice(&f[l3 + 12..l3 + 20]);
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&len.to_be_bytes());
        }
        pseudo
    }

    /// A UDP datagram `udp` (header and payload) verifies against the addresses in `f`.
    fn udp_verifies(f: &[u8], v6: bool, udp: &[u8]) -> bool {
        let mut all = udp_pseudo(f, v6, ETH_HLEN, udp.len() as u16);
        all.extend_from_slice(udp);
        ones_sum(&all) == 0xffff && udp[6..8] != [0, 0]
    }

    fn udp_gso(v6: bool, gso_type: u8, gso_size: u16) -> VnetHdr {
        let l4 = ETH_HLEN + if v6 { 40 } else { 20 };
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: (l4 + 8) as u16,
            gso_size,
            csum_start: l4 as u16,
            csum_offset: 6,
        }
    }

    #[test]
    fn uso_datagrams_verify_and_reassemble() {
        for v6 in [false, true] {
            for (n, size) in [
                (10_000, 1472),
                (1472 * 3, 1472),
                (1, 1472),
                (0, 1000),
                (999, 7),
            ] {
                let data = payload(n);
                let frame = udp_frame(v6, &data);
                let hdr = udp_gso(v6, GSO_UDP_L4, size);
                let ok = validate(&hdr, &frame, 65535, ALL).unwrap();
                let l4 = ETH_HLEN + if v6 { 40 } else { 20 };
                assert_eq!(usize::from(ok.hdr_len), l4 + 8);
                let mut segs = Vec::new();
                assert!(segment_gso(
                    &frame,
                    &ok,
                    2,
                    |l| vec![0xee; 2 + l],
                    |s| segs.push(s)
                ));
                assert_eq!(segs.len(), n.div_ceil(usize::from(size)).max(1));
                let mut joined = Vec::new();
                for (i, s) in segs.iter().enumerate() {
                    let s = &s[2..];
                    let udp = &s[l4..];
                    assert!(udp.len() - 8 <= usize::from(size));
                    assert_eq!(usize::from(be16(udp, 4)), udp.len(), "UDP length");
                    assert!(udp_verifies(s, v6, udp), "datagram {i} checksum");
                    assert_eq!(&s[..12], &frame[..12]);
                    if v6 {
                        assert_eq!(usize::from(be16(s, ETH_HLEN + 4)), udp.len());
                    } else {
                        assert_eq!(ones_sum(&s[ETH_HLEN..l4]), 0xffff, "IPv4 checksum");
                        assert_eq!(usize::from(be16(s, ETH_HLEN + 2)), s.len() - ETH_HLEN);
                        assert_eq!(be16(s, ETH_HLEN + 4), 0x1234 + i as u16);
                    }
                    joined.extend_from_slice(&udp[8..]);
                }
                assert_eq!(joined, data);
            }
        }
    }

    #[test]
    fn ufo_fragments_reassemble_into_the_checksummed_datagram() {
        for v6 in [false, true] {
            for (n, size) in [(10_000, 1480), (3000, 1483), (100, 1480), (4000, 8)] {
                let data = payload(n);
                let frame = udp_frame(v6, &data);
                let hdr = udp_gso(v6, GSO_UDP, size);
                let ok = validate(&hdr, &frame, 65535, ALL).unwrap();
                let mut frags = Vec::new();
                assert!(segment_gso(
                    &frame,
                    &ok,
                    0,
                    |l| vec![0; l],
                    |s| frags.push(s)
                ));
                let l4 = ETH_HLEN + if v6 { 40 } else { 20 };
                let hlen = l4 + if v6 { 8 } else { 0 };
                let unit = usize::from(size) & !7;
                let total = 8 + n;
                assert_eq!(frags.len(), total.div_ceil(unit));
                let mut datagram = vec![0u8; total];
                let mut ids = Vec::new();
                for (i, f) in frags.iter().enumerate() {
                    let last = i + 1 == frags.len();
                    assert_eq!(&f[..12], &frame[..12]);
                    let piece = &f[hlen..];
                    assert!(piece.len() <= unit && (last || piece.len() == unit));
                    let (offset, more) = if v6 {
                        assert_eq!(f[ETH_HLEN + 6], IPPROTO_FRAGMENT);
                        assert_eq!(usize::from(be16(f, ETH_HLEN + 4)), 8 + piece.len());
                        assert_eq!(f[l4], IPPROTO_UDP);
                        ids.push(u32::from_be_bytes(f[l4 + 4..l4 + 8].try_into().unwrap()));
                        let fo = be16(f, l4 + 2);
                        (usize::from(fo & 0xfff8), fo & 1 != 0)
                    } else {
                        assert_eq!(ones_sum(&f[ETH_HLEN..l4]), 0xffff, "IPv4 checksum");
                        assert_eq!(usize::from(be16(f, ETH_HLEN + 2)), f.len() - ETH_HLEN);
                        ids.push(u32::from(be16(f, ETH_HLEN + 4)));
                        let fo = be16(f, ETH_HLEN + 6);
                        assert_eq!(fo & 0x4000, 0, "DF cleared");
                        (usize::from(fo & 0x1fff) * 8, fo & 0x2000 != 0)
                    };
                    assert_eq!((offset, more), (i * unit, !last));
                    datagram[offset..offset + piece.len()].copy_from_slice(piece);
                }
                ids.dedup();
                assert_eq!(ids.len(), 1, "one id for all fragments");
                assert_eq!(usize::from(be16(&datagram, 4)), total, "UDP length");
                assert!(udp_verifies(&frame, v6, &datagram), "reassembled checksum");
                assert_eq!(&datagram[8..], &data[..]);
            }
        }
    }

    #[test]
    fn validate_bounds_udp_offloads() {
        let v4 = udp_frame(false, &payload(5000));
        let v6 = udp_frame(true, &payload(5000));
        let max = 1514;
        let uso4 = udp_gso(false, GSO_UDP_L4, 1472);
        let uso6 = udp_gso(true, GSO_UDP_L4, 1452);
        let ufo4 = udp_gso(false, GSO_UDP, 1480);
        let ufo6 = udp_gso(true, GSO_UDP, 1448);
        for (hdr, frame) in [(uso4, &v4), (uso6, &v6), (ufo4, &v4), (ufo6, &v6)] {
            assert!(validate(&hdr, frame, max, ALL).is_ok(), "{hdr:?}");
            // Not negotiated.
            let tso_only = Offloads::new(true, true, true);
            assert_eq!(validate(&hdr, frame, max, tso_only), Err(HdrError::GsoType));
            // Without NEEDS_CSUM; the TCP checksum offset; csum_start elsewhere.
            let bad = [
                VnetHdr { flags: 0, ..hdr },
                VnetHdr {
                    csum_offset: 16,
                    ..hdr
                },
                VnetHdr {
                    csum_start: hdr.csum_start - 2,
                    ..hdr
                },
                VnetHdr {
                    hdr_len: frame.len() as u16 + 1,
                    ..hdr
                },
                VnetHdr { gso_size: 0, ..hdr },
                VnetHdr {
                    gso_size: 1500, // over the MTU
                    ..hdr
                },
                VnetHdr {
                    gso_type: hdr.gso_type | 0x80, // ECN
                    ..hdr
                },
            ];
            for b in bad {
                assert!(validate(&b, frame, max, ALL).is_err(), "{b:?}");
            }
            // A UDP offload on a TCP frame.
            let tcp = tcp_frame(hdr.csum_start == 54, 0, &payload(3000), 0x10);
            assert_eq!(validate(&hdr, &tcp, max, ALL), Err(HdrError::Headers));
        }
        // USO per IP version.
        let only4 = Offloads::new(true, false, false).with_udp(false, true, false);
        assert!(validate(&uso4, &v4, max, only4).is_ok());
        assert_eq!(validate(&uso6, &v6, max, only4), Err(HdrError::GsoType));
        // UFO: fragments of under 8 bytes, too many of them, IPv4 options.
        let tiny = VnetHdr {
            gso_size: 7,
            ..ufo4
        };
        assert_eq!(validate(&tiny, &v4, max, ALL), Err(HdrError::GsoSize));
        let big = udp_frame(false, &payload(60_000));
        let many = VnetHdr {
            gso_size: 8,
            ..ufo4
        };
        assert_eq!(validate(&many, &big, max, ALL), Err(HdrError::GsoSize));
        let many = VnetHdr {
            gso_size: 8,
            ..uso4
        };
        assert_eq!(validate(&many, &big, max, ALL), Err(HdrError::GsoSize));
        let mut opts = v4.clone();
        opts[ETH_HLEN] = 0x46;
        opts.splice(34..34, [1, 1, 1, 0]);
        let h = VnetHdr {
            csum_start: 38,
            ..ufo4
        };
        assert_eq!(validate(&h, &opts, max, ALL), Err(HdrError::Headers));
        let h = VnetHdr {
            csum_start: 38,
            gso_size: 1468,
            ..uso4
        };
        assert!(validate(&h, &opts, max, ALL).is_ok(), "USO copies options");
        // A fragment is not a datagram to fragment again.
        let mut frag = v4.clone();
        frag[ETH_HLEN + 6] = 0x20;
        assert_eq!(validate(&ufo4, &frag, max, ALL), Err(HdrError::Headers));
    }

    #[test]
    fn rx_action_picks_uso_by_ip_version_and_completes_udp_checksums() {
        let v4 = udp_frame(false, &payload(3000));
        let v6 = udp_frame(true, &payload(3000));
        let only6 = Offloads::new(true, false, false).with_udp(false, false, true);
        let uso = udp_gso(false, GSO_UDP_L4, 1472);
        assert_eq!(rx_action(&uso, &v4, only6), RxAction::Segment);
        assert_eq!(rx_action(&uso, &v6, only6), RxAction::Pass(uso));
        let ufo = udp_gso(false, GSO_UDP, 1480);
        assert_eq!(rx_action(&ufo, &v4, only6), RxAction::Segment);
        assert_eq!(
            rx_action(
                &ufo,
                &v4,
                Offloads::new(true, false, false).with_udp(true, false, false)
            ),
            RxAction::Pass(ufo)
        );
        // UDP offloads need the checksum offload.
        assert_eq!(
            Offloads::new(false, false, false).with_udp(true, true, true),
            Offloads::NONE
        );
        // A partial UDP checksum completed: verifies, and is never 0.
        for n in [0, 1, 2, 101, 1472] {
            for v6 in [false, true] {
                let mut f = udp_frame(v6, &payload(n));
                let l4 = ETH_HLEN + if v6 { 40 } else { 20 };
                assert!(complete_csum(&mut f, l4, 6));
                assert!(udp_verifies(&f, v6, &f[l4..]), "n={n} v6={v6}");
            }
        }
    }

    proptest::proptest! {
        /// UDP offload headers with lying sizes and lengths over mangled frames: validation
        /// and segmentation never panic, and what is accepted cuts into frames within the
        /// limit.
        #[test]
        fn udp_gso_headers_that_lie_never_panic(
            gso_size in 0u16..4000,
            hdr_len in proptest::prelude::any::<u16>(),
            ufo in proptest::prelude::any::<bool>(),
            v6 in proptest::prelude::any::<bool>(),
            n in 0usize..9000,
            max in 60usize..9000,
            mangle in proptest::collection::vec((0usize..70, proptest::prelude::any::<u8>()), 0..4),
        ) {
            let mut frame = udp_frame(v6, &payload(n));
            for (i, b) in mangle {
                if i < frame.len() {
                    frame[i] = b;
                }
            }
            let hdr = VnetHdr {
                hdr_len,
                ..udp_gso(v6, if ufo { GSO_UDP } else { GSO_UDP_L4 }, gso_size)
            };
            if let Ok(ok) = validate(&hdr, &frame, max, ALL) {
                let mut longest = 0;
                let mut count = 0;
                let cut = segment_gso(&frame, &ok, 0, |l| vec![0; l], |s| {
                    longest = longest.max(s.len());
                    count += 1;
                });
                proptest::prop_assert!(cut);
                proptest::prop_assert!(longest <= max, "{longest} > {max}");
                proptest::prop_assert!(count <= MAX_GSO_SEGS);
            }
        }
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
            udp in proptest::prelude::any::<bool>(),
        ) {
            let mut frame = if udp {
                udp_frame(v6, &payload(n))
            } else {
                tcp_frame(v6, 0, &payload(n), 0x18)
            };
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
                    let _ = size;
                    let cut = segment_gso(&frame, &ok, 0, |l| vec![0; l], |s| {
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
