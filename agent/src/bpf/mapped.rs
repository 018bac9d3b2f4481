//! An array map mapped into the agent's memory (`BPF_F_MMAPABLE`): its
//! entries are read and written in place, with no syscall per entry.

use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;

use aya::maps::{Map, MapData};
use aya::Ebpf;

use super::BpfError;

/// include/uapi/linux/bpf.h
const BPF_F_MMAPABLE: u32 = 1 << 10;

pub struct MappedArray<T> {
    base: NonNull<u8>,
    bytes: usize,
    stride: usize,
    entries: usize,
    /// Kept open for as long as the mapping (the mapping holds the map too;
    /// this keeps its pin and its identity plain to see).
    _map: MapData,
    _entry: PhantomData<T>,
}

// SAFETY: the mapping belongs to this value alone; moving it to another
// thread moves the only way to reach it.
unsafe impl<T> Send for MappedArray<T> {}

impl<T: aya::Pod> MappedArray<T> {
    /// Takes `name` out of `ebpf` and maps all of its entries.
    pub fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Self, BpfError> {
        let map = ebpf.take_map(name).ok_or(BpfError::MissingMap(name))?;
        let Map::Array(map) = map else {
            return Err(BpfError::Mapped { map: name, reason: "not an array map".into() });
        };
        let info = map.info().map_err(|source| BpfError::Map { map: name, source })?;
        if info.map_flags() & BPF_F_MMAPABLE == 0 {
            return Err(BpfError::Mapped { map: name, reason: "made without BPF_F_MMAPABLE".into() });
        }
        if info.value_size() as usize != size_of::<T>() {
            return Err(BpfError::Mapped {
                map: name,
                reason: format!("entries of {} bytes, this build reads {}", info.value_size(), size_of::<T>()),
            });
        }
        // the kernel's layout: entries 8-byte aligned, from the start of the
        // mapping, which covers whole pages
        let stride = size_of::<T>().next_multiple_of(8);
        let entries = info.max_entries() as usize;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let bytes = (stride * entries).next_multiple_of(page);
        // SAFETY: a shared mapping of the map's own fd and size; the kernel
        // checks both.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(BpfError::Mapped { map: name, reason: std::io::Error::last_os_error().to_string() });
        }
        let base = NonNull::new(base.cast::<u8>())
            .ok_or_else(|| BpfError::Mapped { map: name, reason: "mmap returned null".into() })?;
        Ok(MappedArray { base, bytes, stride, entries, _map: map, _entry: PhantomData })
    }

    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Entry `i`, in place. The kernel writes it concurrently: read it with
    /// atomics or volatile reads, as its protocol says.
    pub fn entry(&self, i: usize) -> *mut T {
        assert!(i < self.entries, "entry {i} of {}", self.entries);
        // SAFETY: in bounds (checked above); entries start 8-byte aligned.
        unsafe { self.base.as_ptr().add(i * self.stride).cast::<T>() }
    }
}

impl<T> Drop for MappedArray<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in take(), unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}
