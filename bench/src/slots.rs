//! Counters the bench shares with its resolver process: `u64` atomics in a file both map.
//!
//! The resolver runs in a process of its own, as a real backend does, yet it
//! must answer every resolve with the version the notifier published before
//! its `Notify`: both processes map the same file (`MAP_SHARED`), so a
//! version stored by the bench is what the resolver loads, with the usual
//! atomic ordering, and the resolver's request counters are read back the
//! same way.

use std::{
    fs::{File, OpenOptions},
    io,
    ops::Deref,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

/// `len` `u64` atomics shared through the file at `path`.
pub struct Slots {
    ptr: NonNull<AtomicU64>,
    len: usize,
    path: PathBuf,
    /// The creator removes the file when it drops the mapping.
    owner: bool,
    _file: File,
}

// SAFETY: the mapping holds only atomics, which are Sync; it lives (and stays
// mapped) as long as this value.
unsafe impl Send for Slots {}
unsafe impl Sync for Slots {}

impl Slots {
    /// A new file of `len` zeroed slots in the temp dir, mapped.
    pub fn create(len: usize) -> io::Result<Slots> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "entity-sync-bench-{}-{}.slots",
            std::process::id(),
            NEXT.fetch_add(1, Relaxed)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        // A file grown by set_len reads as zeros.
        file.set_len((len.max(1) * 8) as u64)?;
        let ptr = map(&file, len)?;
        Ok(Slots {
            ptr,
            len,
            path,
            owner: true,
            _file: file,
        })
    }

    /// Maps the slots another process created at `path`.
    pub fn open(path: &Path, len: usize) -> io::Result<Slots> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.metadata()?.len();
        if size < (len * 8) as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} holds {size} bytes, not {len} slots", path.display()),
            ));
        }
        let ptr = map(&file, len)?;
        Ok(Slots {
            ptr,
            len,
            path: path.to_owned(),
            owner: false,
            _file: file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn map(file: &File, len: usize) -> io::Result<NonNull<AtomicU64>> {
    // SAFETY: a fresh shared mapping of a file we hold open, at least
    // `len * 8` bytes long; the kernel picks the (page-aligned) address.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len.max(1) * 8,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(ptr.cast::<AtomicU64>()).ok_or_else(|| io::Error::other("mmap returned null"))
}

impl Deref for Slots {
    type Target = [AtomicU64];

    fn deref(&self) -> &[AtomicU64] {
        // SAFETY: `len` atomics, page-aligned, mapped for as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, with the same length.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len.max(1) * 8);
        }
        if self.owner {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::{Acquire, Release};

    #[test]
    fn two_mappings_of_one_file_see_each_others_stores() {
        let created = Slots::create(4).unwrap();
        assert!(created.iter().all(|s| s.load(Acquire) == 0));
        let opened = Slots::open(created.path(), 4).unwrap();
        created[2].store(41, Release);
        assert_eq!(opened[2].fetch_add(1, Relaxed), 41);
        assert_eq!(created[2].load(Acquire), 42);
        assert!(Slots::open(created.path(), 5).is_err(), "too short");
        let path = created.path().to_owned();
        drop(opened);
        drop(created);
        assert!(!path.exists(), "the creator removes the file");
    }
}
