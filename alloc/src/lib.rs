//! The sidecar's global allocator: the system allocator, with every block
//! of [`LINE_ALIGNED_FROM`] bytes or more starting on a cache line.
//!
//! glibc copies blocks of about 2 KiB and more with `rep movsb`, which
//! some x86 CPUs (AMD Zen 3 and 4 among them) run several times slower
//! when the destination does not start on a cache line, and glibc's
//! `malloc` promises only 16 bytes. rustls copies every TLS record it
//! decrypts (up to 16 KiB) into a block of its own, so on those CPUs the
//! receiving sidecar of a bulk transfer spent a third of its time or more
//! in that one copy, or not, depending on where the block happened to
//! land. Small blocks, most of what a request allocates, are untouched.
//!
//! This is the workspace's only unsafe code: a [`GlobalAlloc`] cannot be
//! written without it. Each method forwards to [`System`].

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks this large or larger start on a cache line (glibc's threshold
/// for `rep movsb` is 2,048 bytes and up, scaled with the vector width).
pub const LINE_ALIGNED_FROM: usize = 2048;

/// A cache line.
pub const LINE: usize = 64;

/// [`System`], cache-line aligning blocks of [`LINE_ALIGNED_FROM`] bytes
/// or more.
#[derive(Debug, Default, Clone, Copy)]
pub struct LineAligned;

/// The layout a block of `layout` is allocated with: the same size, and
/// at least [`LINE`] alignment from [`LINE_ALIGNED_FROM`] bytes on.
fn placed(layout: Layout) -> Layout {
    if layout.size() >= LINE_ALIGNED_FROM && layout.align() < LINE {
        // Fails only if the size rounded up to a line overflows `isize`;
        // such a block is then allocated as asked.
        layout.align_to(LINE).unwrap_or(layout)
    } else {
        layout
    }
}

// SAFETY: every method hands `System` a layout derived from the caller's by
// `placed` alone (same size, alignment at least the caller's), so a block
// satisfies the caller's layout, and `dealloc` and `realloc`, called with
// the layout the block was allocated with, derive the layout `System`
// allocated it with.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for LineAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: `placed` keeps the size non-zero when `layout`'s is.
        unsafe { System.alloc(placed(layout)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(placed(layout)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `alloc` with `placed(layout)`.
        unsafe { System.dealloc(ptr, placed(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = placed(layout);
        // SAFETY: the caller promises that `new_size`, rounded up to
        // `layout`'s alignment, does not overflow `isize`.
        let new = placed(unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) });
        if old.align() == new.align() {
            // SAFETY: `ptr` was allocated with `old`, whose alignment the
            // block keeps at `new_size`.
            return unsafe { System.realloc(ptr, old, new_size) };
        }
        // Crossing the threshold changes the alignment: move the block.
        // SAFETY: `new` has a non-zero size (it is at least the old size
        // or the threshold), `ptr` holds `old.size()` bytes and is freed
        // with the layout it was allocated with.
        unsafe {
            let moved = System.alloc(new);
            if !moved.is_null() {
                std::ptr::copy_nonoverlapping(ptr, moved, old.size().min(new_size));
                System.dealloc(ptr, old);
            }
            moved
        }
    }
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use super::*;

    fn line_aligned(ptr: *mut u8) -> bool {
        (ptr as usize).is_multiple_of(LINE)
    }

    /// Large blocks start on a cache line, whatever the allocator did
    /// before; small ones keep the caller's alignment.
    #[test]
    fn large_blocks_start_on_a_cache_line() {
        let a = LineAligned;
        let mut blocks = Vec::new();
        // Odd sizes in between, so the heap's next free address is rarely
        // a line start by chance.
        for size in [24, LINE_ALIGNED_FROM, 40, 16_385, 8, 65_536, 3_000] {
            let layout = Layout::from_size_align(size, 1).unwrap();
            let ptr = unsafe { a.alloc(layout) };
            assert!(!ptr.is_null());
            if size >= LINE_ALIGNED_FROM {
                assert!(line_aligned(ptr), "{size} bytes at {ptr:p}");
            }
            blocks.push((ptr, layout));
        }
        let zeroed = Layout::from_size_align(16_384, 8).unwrap();
        let z = unsafe { a.alloc_zeroed(zeroed) };
        assert!(line_aligned(z));
        assert!(
            unsafe { std::slice::from_raw_parts(z, 16_384) }
                .iter()
                .all(|&b| b == 0)
        );
        unsafe { a.dealloc(z, zeroed) };
        for (ptr, layout) in blocks {
            unsafe { a.dealloc(ptr, layout) };
        }
    }

    /// Growing a block across the threshold and shrinking it back keeps
    /// its bytes and gives the alignment of the new size.
    #[test]
    fn realloc_across_the_threshold_keeps_the_bytes() {
        let a = LineAligned;
        let small = Layout::from_size_align(100, 1).unwrap();
        let ptr = unsafe { a.alloc(small) };
        let bytes: Vec<u8> = (0..100u8).collect();
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, 100) };

        let grown = unsafe { a.realloc(ptr, small, 10_000) };
        assert!(line_aligned(grown));
        assert_eq!(
            unsafe { std::slice::from_raw_parts(grown, 100) },
            &bytes[..]
        );

        let large = Layout::from_size_align(10_000, 1).unwrap();
        let larger = unsafe { a.realloc(grown, large, 50_000) };
        assert!(line_aligned(larger));
        assert_eq!(
            unsafe { std::slice::from_raw_parts(larger, 100) },
            &bytes[..]
        );

        let larger_layout = Layout::from_size_align(50_000, 1).unwrap();
        let shrunk = unsafe { a.realloc(larger, larger_layout, 50) };
        assert_eq!(
            unsafe { std::slice::from_raw_parts(shrunk, 50) },
            &bytes[..50]
        );
        unsafe { a.dealloc(shrunk, Layout::from_size_align(50, 1).unwrap()) };
    }

    /// A caller asking for more than a line gets what it asked for.
    #[test]
    fn a_stricter_alignment_is_kept() {
        let a = LineAligned;
        let layout = Layout::from_size_align(4096, 4096).unwrap();
        let ptr = unsafe { a.alloc(layout) };
        assert!((ptr as usize).is_multiple_of(4096));
        unsafe { a.dealloc(ptr, layout) };
    }
}
