//! The device IOTLB for VIRTIO_F_ACCESS_PLATFORM: which IOVA ranges map to which front-end
//! userspace addresses, with which permission.
//!
//! The front-end (the IOMMU's owner) fills it with vhost-user IOTLB_MSG UPDATE and shrinks it
//! with INVALIDATE. The queues never look at it directly: [`Iotlb::snapshot`] turns it into a
//! [`GuestMemory`] keyed by IOVA whose regions are windows into the already mapped regions (no new
//! mmap), each carrying its entry's permission, so the translation and bounds checks of the
//! queues apply unchanged and an address without an entry is a miss.
//!
//! Entries never overlap: an update replaces whatever it overlaps (the newest translation wins,
//! as after an IOMMU remap), an invalidation cuts the range out of the entries it touches.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::MemoryError;
use crate::memory::{Access, GuestMemory, MemoryRegion};

/// Most entries one IOTLB holds; a front-end that sends more gets an error, not our memory.
pub const MAX_IOTLB_ENTRIES: usize = 1 << 16;

/// One translation: `[iova, iova + size)` → `[uaddr, uaddr + size)` with `access`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IotlbEntry {
    pub iova: u64,
    pub size: u64,
    pub uaddr: u64,
    pub access: Access,
}

impl IotlbEntry {
    fn end(&self) -> u64 {
        // Checked at insertion.
        self.iova + self.size
    }
}

/// The IOTLB perm value of vhost-user (1 RO, 2 WO, 3 RW) as an [`Access`]; `None` for 0 (no
/// access) and unknown values.
pub fn access_from_perm(perm: u8) -> Option<Access> {
    match perm {
        1 => Some(Access::READ),
        2 => Some(Access::WRITE),
        3 => Some(Access::READ_WRITE),
        _ => None,
    }
}

/// The vhost-user IOTLB perm value of `access` (0 for none).
pub fn perm_from_access(access: Access) -> u8 {
    u8::from(access.read) | (u8::from(access.write) << 1)
}

/// The set of IOTLB entries of one session. See the module docs.
#[derive(Debug, Default, Clone)]
pub struct Iotlb {
    /// Keyed by `iova`; the entries do not overlap.
    entries: BTreeMap<u64, IotlbEntry>,
}

fn bad(what: String) -> MemoryError {
    MemoryError::Iotlb(what)
}

impl Iotlb {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries, by IOVA.
    pub fn entries(&self) -> impl Iterator<Item = &IotlbEntry> {
        self.entries.values()
    }

    /// Add a translation (IOTLB_MSG UPDATE). `[uaddr, uaddr + size)` must lie inside one region
    /// of `memory` (the front-end's memory table); overlapped entries are replaced.
    pub fn update(
        &mut self,
        iova: u64,
        size: u64,
        uaddr: u64,
        perm: u8,
        memory: &GuestMemory,
    ) -> Result<(), MemoryError> {
        let what = || format!("update iova {iova:#x} size {size:#x} uaddr {uaddr:#x}");
        let access =
            access_from_perm(perm).ok_or_else(|| bad(format!("{}: bad perm {perm}", what())))?;
        if size == 0 {
            return Err(bad(format!("{}: size is zero", what())));
        }
        let end = iova
            .checked_add(size)
            .ok_or_else(|| bad(format!("{}: iova + size overflows", what())))?;
        let uaddr_end = uaddr
            .checked_add(size)
            .ok_or_else(|| bad(format!("{}: uaddr + size overflows", what())))?;
        let inside = memory
            .find_region_by_uva(uaddr)
            .is_some_and(|region| uaddr_end - region.userspace_addr() <= region.size());
        if !inside {
            return Err(bad(format!(
                "{}: uaddr range is not inside one memory region",
                what()
            )));
        }
        self.remove_range(iova, end);
        if self.entries.len() >= MAX_IOTLB_ENTRIES {
            return Err(bad(format!(
                "{}: more than {MAX_IOTLB_ENTRIES} entries",
                what()
            )));
        }
        self.entries.insert(
            iova,
            IotlbEntry {
                iova,
                size,
                uaddr,
                access,
            },
        );
        Ok(())
    }

    /// Drop every translation of `[iova, iova + size)` (IOTLB_MSG INVALIDATE); a range running
    /// past the end of the address space is cut there. Returns whether anything was dropped.
    pub fn invalidate(&mut self, iova: u64, size: u64) -> Result<bool, MemoryError> {
        if size == 0 {
            return Err(bad(format!("invalidate iova {iova:#x}: size is zero")));
        }
        Ok(self.remove_range(iova, iova.saturating_add(size)))
    }

    /// Cut `[start, end)` out of the entries, keeping the parts of them outside it.
    fn remove_range(&mut self, start: u64, end: u64) -> bool {
        // Entries are sorted and disjoint: the ones overlapping the range are the last ones that
        // start before `end`, back to the first that ends after `start`.
        let hit: Vec<IotlbEntry> = self
            .entries
            .range(..end)
            .rev()
            .map(|(_, e)| *e)
            .take_while(|e| e.end() > start)
            .collect();
        for entry in &hit {
            self.entries.remove(&entry.iova);
            if entry.iova < start {
                let size = start - entry.iova;
                self.entries
                    .insert(entry.iova, IotlbEntry { size, ..*entry });
            }
            if entry.end() > end {
                let cut = end - entry.iova;
                self.entries.insert(
                    end,
                    IotlbEntry {
                        iova: end,
                        size: entry.size - cut,
                        uaddr: entry.uaddr + cut,
                        access: entry.access,
                    },
                );
            }
        }
        !hit.is_empty()
    }

    /// The translation view the queues use: a [`GuestMemory`] keyed by IOVA whose regions are
    /// windows into `memory`'s regions with each entry's permission. Neighbouring entries that
    /// are contiguous in both IOVA and memory and have the same permission become one window, so
    /// a ring spanning several IOMMU pages is one contiguous area. Entries whose uaddr no longer
    /// lies in `memory` (the memory table changed since) are left out: using them is a miss.
    pub fn snapshot(&self, memory: &GuestMemory) -> Result<GuestMemory, MemoryError> {
        let mut windows: Vec<Arc<MemoryRegion>> = Vec::new();
        // (region, first iova, uaddr offset in the region, size, access) of the window being built.
        let mut open: Option<(&Arc<MemoryRegion>, u64, u64, u64, Access)> = None;
        for entry in self.entries.values() {
            let Some(region) = memory.find_region_by_uva(entry.uaddr) else {
                continue;
            };
            let offset = entry.uaddr - region.userspace_addr();
            if offset
                .checked_add(entry.size)
                .is_none_or(|end| end > region.size())
            {
                continue;
            }
            if let Some((r, iova, start, size, access)) = open {
                if Arc::ptr_eq(r, region)
                    && iova + size == entry.iova
                    && start + size == offset
                    && access == entry.access
                {
                    open = Some((r, iova, start, size + entry.size, access));
                    continue;
                }
                windows.push(Arc::new(MemoryRegion::view(r, start, size, iova, access)?));
            }
            open = Some((region, entry.iova, offset, entry.size, entry.access));
        }
        if let Some((r, iova, start, size, access)) = open {
            windows.push(Arc::new(MemoryRegion::view(r, start, size, iova, access)?));
        }
        GuestMemory::new_iova(windows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_memfd, RegionSpec};
    use std::sync::atomic::Ordering;

    const UVA: u64 = 0x7f00_0000_0000;

    /// Two 64 KiB regions: gpa 0 at UVA, gpa 0x10000 at UVA + 0x100000.
    fn memory() -> GuestMemory {
        let regions = [(0u64, UVA), (0x10000, UVA + 0x10_0000)]
            .into_iter()
            .map(|(gpa, uva)| {
                let fd = create_memfd("iotlb-test", 0x10000).unwrap();
                let spec = RegionSpec {
                    guest_phys_addr: gpa,
                    size: 0x10000,
                    userspace_addr: uva,
                    mmap_offset: 0,
                };
                Arc::new(MemoryRegion::map(fd, spec).unwrap())
            })
            .collect();
        GuestMemory::new(regions).unwrap()
    }

    #[test]
    fn translates_iova_through_uaddr_into_the_shared_mapping() {
        let mem = memory();
        let mut tlb = Iotlb::new();
        // IOVA 0x1000_0000 → gpa 0x2000 (second page of region 0).
        tlb.update(0x1000_0000, 0x1000, UVA + 0x2000, 3, &mem)
            .unwrap();
        let view = tlb.snapshot(&mem).unwrap();
        assert!(view.is_iova());
        view.write(0x1000_0010, b"through the iotlb").unwrap();
        let mut back = [0u8; 17];
        mem.read(0x2010, &mut back).unwrap();
        assert_eq!(&back, b"through the iotlb");
        // Outside the entry: unmapped, and first_unmapped points at the miss.
        assert!(view.slice(0x1000_1000, 1).is_err());
        assert_eq!(view.first_unmapped(0x1000_0ff0, 0x20), Some(0x1000_1000));
        assert_eq!(view.first_unmapped(0x1000_0000, 0x1000), None);
    }

    #[test]
    fn contiguous_entries_merge_into_one_window_and_aliases_are_allowed() {
        let mem = memory();
        let mut tlb = Iotlb::new();
        tlb.update(0x4000, 0x1000, UVA + 0x8000, 3, &mem).unwrap();
        tlb.update(0x5000, 0x1000, UVA + 0x9000, 3, &mem).unwrap();
        // Same memory again at another IOVA (an alias), and a read-only neighbour.
        tlb.update(0x9000, 0x1000, UVA + 0x8000, 3, &mem).unwrap();
        tlb.update(0x6000, 0x1000, UVA + 0xa000, 1, &mem).unwrap();
        let view = tlb.snapshot(&mem).unwrap();
        assert_eq!(view.regions().len(), 3, "{view:?}");
        assert_eq!(view.slice(0x4800, 0x1000).unwrap().len(), 0x1000);
        view.store_u32(0x4ffc, 0xdead_beef, Ordering::Relaxed)
            .unwrap();
        assert_eq!(
            view.load_u32(0x9ffc, Ordering::Relaxed).unwrap(),
            0xdead_beef
        );
        // The permission of each window is kept.
        let ro = view.find_region(0x6000).unwrap();
        assert_eq!(ro.access(), Access::READ);
        assert!(view.slice_exact_for(0x6000, 8, Access::WRITE).is_err());
        assert!(view.slice_exact_for(0x6000, 8, Access::READ).is_ok());
        assert!(view
            .slice_exact_for(0x4000, 0x2000, Access::READ_WRITE)
            .is_ok());
    }

    #[test]
    fn entries_do_not_merge_across_regions() {
        let mem = memory();
        let mut tlb = Iotlb::new();
        // Contiguous IOVAs, but the uaddrs are in different regions.
        tlb.update(0x0, 0x1000, UVA + 0xf000, 3, &mem).unwrap();
        tlb.update(0x1000, 0x1000, UVA + 0x10_0000, 3, &mem)
            .unwrap();
        let view = tlb.snapshot(&mem).unwrap();
        assert_eq!(view.regions().len(), 2);
        assert!(view.slice_exact(0xff0, 0x20).is_err());
        let mut data = [7u8; 0x20];
        view.write(0xff0, &data).unwrap();
        data = [0; 0x20];
        view.read(0xff0, &mut data).unwrap();
        assert_eq!(data, [7u8; 0x20]);
    }

    #[test]
    fn invalidation_cuts_ranges_out_of_entries() {
        let mem = memory();
        let mut tlb = Iotlb::new();
        tlb.update(0x10000, 0x4000, UVA, 3, &mem).unwrap();
        assert!(tlb.invalidate(0x11000, 0x1000).unwrap());
        let entries: Vec<_> = tlb.entries().copied().collect();
        assert_eq!(
            entries,
            vec![
                IotlbEntry {
                    iova: 0x10000,
                    size: 0x1000,
                    uaddr: UVA,
                    access: Access::READ_WRITE
                },
                IotlbEntry {
                    iova: 0x12000,
                    size: 0x2000,
                    uaddr: UVA + 0x2000,
                    access: Access::READ_WRITE
                },
            ]
        );
        let view = tlb.snapshot(&mem).unwrap();
        assert_eq!(view.first_unmapped(0x10000, 0x4000), Some(0x11000));
        // Invalidating nothing is fine; everything (running past the end) empties it.
        assert!(!tlb.invalidate(0x9000_0000, 0x1000).unwrap());
        assert!(tlb.invalidate(0, u64::MAX).unwrap());
        assert!(tlb.is_empty());
        assert!(tlb.snapshot(&mem).unwrap().regions().is_empty());
    }

    #[test]
    fn overlapping_update_replaces_what_it_covers() {
        let mem = memory();
        let mut tlb = Iotlb::new();
        tlb.update(0x0, 0x3000, UVA, 3, &mem).unwrap();
        tlb.update(0x1000, 0x1000, UVA + 0x8000, 1, &mem).unwrap();
        // The same update again (two misses answered twice) changes nothing.
        tlb.update(0x1000, 0x1000, UVA + 0x8000, 1, &mem).unwrap();
        assert_eq!(tlb.len(), 3);
        let view = tlb.snapshot(&mem).unwrap();
        mem.write(0x8000, b"new").unwrap();
        let mut back = [0u8; 3];
        view.read(0x1000, &mut back).unwrap();
        assert_eq!(&back, b"new");
        assert_eq!(
            view.find_region(0x2000).unwrap().userspace_addr(),
            UVA + 0x2000
        );
    }

    #[test]
    fn hostile_updates_are_refused_with_a_clear_error() {
        let mem = memory();
        let mut tlb = Iotlb::new();
        let cases = [
            (0x1000, 0, UVA, 3, "size is zero"),
            (u64::MAX - 0xfff, 0x2000, UVA, 3, "iova + size overflows"),
            (
                0x1000,
                0x1000,
                u64::MAX - 0xfff,
                3,
                "uaddr + size overflows",
            ),
            (
                0x1000,
                0x1000,
                0x1234_0000,
                3,
                "not inside one memory region",
            ),
            // Runs off the end of region 0 (into the gap before region 1).
            (
                0x1000,
                0x2000,
                UVA + 0xf000,
                3,
                "not inside one memory region",
            ),
            (0x1000, 0x1000, UVA, 0, "bad perm 0"),
            (0x1000, 0x1000, UVA, 4, "bad perm 4"),
        ];
        for (iova, size, uaddr, perm, text) in cases {
            let err = tlb.update(iova, size, uaddr, perm, &mem).unwrap_err();
            assert!(err.to_string().contains(text), "{err} lacks {text}");
        }
        assert!(tlb.is_empty());
        assert!(tlb.invalidate(0, 0).is_err());
    }

    #[test]
    fn the_entry_count_is_bounded() {
        let mem = memory();
        let mut tlb = Iotlb::new();
        for i in 0..MAX_IOTLB_ENTRIES as u64 {
            // Disjoint, non-contiguous IOVAs all aliasing one page.
            tlb.update(i * 0x2000, 0x1000, UVA, 3, &mem).unwrap();
        }
        let err = tlb
            .update(u64::MAX - 0x1000, 0x1000, UVA, 3, &mem)
            .unwrap_err();
        assert!(err.to_string().contains("entries"), "{err}");
        // Replacing an existing entry is still possible at the limit.
        tlb.update(0, 0x1000, UVA + 0x1000, 3, &mem).unwrap();
    }

    #[test]
    fn entries_whose_memory_went_away_are_left_out_of_the_view() {
        let mem = memory();
        let mut tlb = Iotlb::new();
        tlb.update(0x0, 0x1000, UVA, 3, &mem).unwrap();
        tlb.update(0x1000, 0x1000, UVA + 0x10_0000, 3, &mem)
            .unwrap();
        let (smaller, _) = mem.without_region(0x10000).unwrap();
        let view = tlb.snapshot(&smaller).unwrap();
        assert_eq!(view.regions().len(), 1);
        assert_eq!(view.first_unmapped(0, 0x2000), Some(0x1000));
    }

    #[test]
    fn perm_values_round_trip() {
        for perm in 1..=3 {
            assert_eq!(perm_from_access(access_from_perm(perm).unwrap()), perm);
        }
        assert_eq!(access_from_perm(0), None);
    }
}
