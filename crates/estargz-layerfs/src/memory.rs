//! Keeping a long-running process that serves layers small.
//!
//! glibc's allocator raises its mmap threshold each time a large block is freed (up to
//! 32 MiB), after which multi-megabyte chunk buffers come from per-thread arenas and stay
//! resident once freed. With a FUSE session and a fetch thread per layer that is many
//! arenas: measured with 50 layers mounted, 1.6 GiB resident instead of about 0.1 GiB
//! (BENCHMARKS.md, "Memory and scale"). These calls are for the binaries to make; a
//! library does not change process-wide allocator settings on its own.

/// Fixes glibc's mmap threshold at 128 KiB (its default starting point), so that chunk-sized
/// buffers are always mapped and unmapped, never kept by an arena. Call once at start-up of
/// a process that mounts layers. A no-op on other C libraries.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads
    // allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Returns freed heap memory to the system: call after a burst of small allocations that
/// are gone, such as parsing a layer's TOC into its compact index. A no-op on other C
/// libraries.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
