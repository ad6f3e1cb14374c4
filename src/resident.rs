//! What stays resident: giving back the pages a process mapped for work it
//! has finished.
//!
//! A process's program text is mapped from its files (busvisor's binary,
//! libc), and every page it ever ran stays in its resident set, along with
//! its neighbours (a fault maps 64 KiB around it, or the whole large folio
//! the page cache holds it in). The
//! keeper ran busvisor's whole start-up (arguments, configuration, service
//! definitions) and then only waits; the bus ran it too and then serves
//! messages. `drop_code` unmaps the file pages of a process that waits
//! (its text, read-only data and unwind tables): they are clean copies of
//! the files, still in the page cache, and come back with a minor fault the
//! next time they are used. Nothing written is touched.
//!
//! The bus itself does not drop its code once it is ready: what serves one
//! client (the Hello, one call) is most of the code it ran (measured: the
//! same resident set with and without the drop, and with its hot functions
//! laid out first), because each fault maps its neighbours too.

use std::ffi::c_void;
use std::ptr::NonNull;

use nix::sys::mman::{MmapAdvise, madvise};

/// The mappings of `/proc/self/smaps` that are clean copies of files:
/// mapped from a file, not writable, and without a page of their own
/// (`Anonymous: 0 kB`: a read-only mapping that was written before it was
/// made read-only, as the dynamic linker does to relocated data, has such
/// pages, and dropping them would lose what was written). Their starts and
/// lengths.
fn clean_file_mappings(smaps: &str) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        if let Some(range) = mapping_header(line) {
            current = range;
        } else if let Some(anon) = line.strip_prefix("Anonymous:") {
            let clean = anon.split_ascii_whitespace().next() == Some("0");
            if let Some(range) = current.take().filter(|_| clean) {
                found.push(range);
            }
        }
    }
    found
}

/// A header line of smaps (`start-end perms offset dev inode path`): None
/// if the line is no header, Some(None) for a mapping that is not a
/// read-only file mapping.
fn mapping_header(line: &str) -> Option<Option<(usize, usize)>> {
    let mut fields = line.split_ascii_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    if perms.len() != 4 {
        return None;
    }
    // offset, device, inode, then the path (absent for anonymous memory).
    let path = fields.nth(3).unwrap_or("");
    let read_only = perms.starts_with('r') && perms.as_bytes()[1] == b'-';
    Some((read_only && path.starts_with('/') && end > start).then(|| (start, end - start)))
}

/// Unmap the process's clean file pages (see the module's comment).
/// Returns how many bytes of mappings it covered; errors are ignored (this
/// only saves memory).
pub(crate) fn drop_code() -> usize {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut covered = 0;
    for (start, len) in clean_file_mappings(&smaps) {
        let Some(addr) = NonNull::new(start as *mut c_void) else {
            continue;
        };
        // SAFETY: the range is one of this process's own mappings, mapped
        // from a file, not writable, with no page that differs from the
        // file's (it cannot be written without an mprotect, which busvisor
        // never does): the next access (this very code included) faults
        // the same bytes back in from the page cache. Nothing is unmapped.
        if unsafe { madvise(addr, len, MmapAdvise::MADV_DONTNEED) }.is_ok() {
            covered += len;
        }
    }
    covered
}

/// Give glibc's free heap pages back to the system.
pub(crate) fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own heap under its locks and
    // gives free pages back; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// For a process that ran busvisor's start-up and from now on only waits
/// (the keeper, the warden): what it ran and freed goes back.
pub(crate) fn settle() {
    drop_code();
    trim_heap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_clean_read_only_file_mappings_are_taken() {
        let smaps = "\
55d0c0a00000-55d0c0e00000 r-xp 00000000 fe:01 123 /usr/bin/busvisor
Rss:                 100 kB
Anonymous:             0 kB
55d0c0e00000-55d0c0f00000 r--p 00400000 fe:01 123 /usr/bin/busvisor
Anonymous:             0 kB
55d0c0f00000-55d0c0f10000 r--p 00500000 fe:01 123 /usr/bin/busvisor
Anonymous:            64 kB
55d0c0f10000-55d0c0f20000 rw-p 00510000 fe:01 123 /usr/bin/busvisor
Anonymous:             0 kB
55d0c1000000-55d0c1100000 rw-p 00000000 00:00 0                          [heap]
Anonymous:             0 kB
7ffd1b5f0000-7ffd1b5f2000 r-xp 00000000 00:00 0                          [vdso]
Anonymous:             0 kB
7f0000000000-7f0000001000 r-xp 00000000 fe:01 9 /usr/lib/x86_64-linux-gnu/libc.so.6 (deleted)
VmFlags: rd ex mr mw me sd
Anonymous:             0 kB
";
        assert_eq!(
            clean_file_mappings(smaps),
            [
                (0x55d0c0a00000, 0x400000),
                (0x55d0c0e00000, 0x100000),
                (0x7f0000000000, 0x1000)
            ]
        );
    }

    #[test]
    fn dropping_the_code_keeps_the_process_running() {
        // This test's own code is among what is dropped: it must come back.
        assert!(drop_code() > 0);
        let v: Vec<u32> = (0..1000).collect();
        assert_eq!(v.iter().sum::<u32>(), 499_500);
        assert!(drop_code() > 0);
    }
}
