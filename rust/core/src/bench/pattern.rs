//! The `--verify` data pattern: every 512-byte sector says which sector it is, which write
//! (generation) put it there and which run wrote it, and the rest is a stream derived from those,
//! so a block read back from the wrong place, a stale write or a torn one is caught.

pub const SECTOR: usize = 512;
const MAGIC: &[u8; 8] = b"vvubench";

/// What a sector that failed verification held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// The sector number written in it (None: not a pattern sector at all).
    pub sector: Option<u64>,
    pub generation: u64,
    pub run: u64,
}

/// splitmix64: a fast, well-mixed stream from any seed.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fill_sector(out: &mut [u8], sector: u64, generation: u64, run: u64) {
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&sector.to_le_bytes());
    out[16..24].copy_from_slice(&generation.to_le_bytes());
    out[24..32].copy_from_slice(&run.to_le_bytes());
    let mut state = sector ^ generation.rotate_left(32) ^ run;
    for word in out[32..SECTOR].chunks_exact_mut(8) {
        word.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
}

/// Fill `out` (a multiple of 512 bytes) with the pattern of the sectors from `first_sector` on.
pub fn fill(out: &mut [u8], first_sector: u64, generation: u64, run: u64) {
    for (k, sector) in out.chunks_exact_mut(SECTOR).enumerate() {
        fill_sector(sector, first_sector + k as u64, generation, run);
    }
}

/// Check `data` against the pattern; the first sector that differs and what it held.
pub fn check(
    data: &[u8],
    first_sector: u64,
    generation: u64,
    run: u64,
    scratch: &mut [u8; SECTOR],
) -> Result<(), (u64, Found)> {
    for (k, got) in data.chunks_exact(SECTOR).enumerate() {
        let sector = first_sector + k as u64;
        fill_sector(scratch, sector, generation, run);
        if got != &scratch[..] {
            let word = |at: usize| {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(&got[at..at + 8]);
                u64::from_le_bytes(raw)
            };
            let found = Found {
                sector: (&got[..8] == MAGIC).then(|| word(8)),
                generation: word(16),
                run: word(24),
            };
            return Err((sector, found));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check_and_catch_mistakes() {
        let mut scratch = [0u8; SECTOR];
        let mut block = vec![0u8; 4096];
        fill(&mut block, 800, 3, 77);
        assert_eq!(check(&block, 800, 3, 77, &mut scratch), Ok(()));
        // Wrong place, stale generation, other run: each is caught and says what it found.
        let err = check(&block, 808, 3, 77, &mut scratch).unwrap_err();
        assert_eq!(err.0, 808);
        assert_eq!(err.1.sector, Some(800));
        let err = check(&block, 800, 4, 77, &mut scratch).unwrap_err();
        assert_eq!(err.1.generation, 3);
        assert!(check(&block, 800, 3, 78, &mut scratch).is_err());
        // One flipped byte deep in the fifth sector.
        block[4 * SECTOR + 300] ^= 1;
        let err = check(&block, 800, 3, 77, &mut scratch).unwrap_err();
        assert_eq!(err.0, 804);
        assert_eq!(err.1.sector, Some(804));
        // Zeros are no pattern at all.
        let zeros = vec![0u8; SECTOR];
        let err = check(&zeros, 1, 1, 1, &mut scratch).unwrap_err();
        assert_eq!(err.1.sector, None);
    }
}
