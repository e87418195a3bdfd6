//! An in-memory [`BlockDevice`] for tests of the protocol layer.

use std::sync::Mutex;

use bytes::Bytes;

use crate::proto::{STATE_HOLE, STATE_ZERO};
use crate::server::{BlockDevice, DeviceError, Extent};

/// A RAM disk that tracks which 4 KiB blocks were ever written.
pub struct MemDevice {
    data: Mutex<Vec<u8>>,
}

impl MemDevice {
    pub fn new(size: usize) -> Self {
        Self {
            data: Mutex::new(vec![0; size]),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, DeviceError> {
        let d = self.lock();
        Ok(Bytes::copy_from_slice(
            &d[offset as usize..offset as usize + len as usize],
        ))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), DeviceError> {
        self.lock()[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Ok(())
    }

    async fn zero(
        &self,
        offset: u64,
        len: u32,
        _fua: bool,
        _trim: bool,
    ) -> Result<(), DeviceError> {
        self.lock()[offset as usize..offset as usize + len as usize].fill(0);
        Ok(())
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
        let d = self.lock();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let end = offset + len as u64;
        while pos < end {
            let stop = ((pos / 4096 + 1) * 4096).min(end);
            let zero = d[pos as usize..stop as usize].iter().all(|b| *b == 0);
            let flags = if zero { STATE_HOLE | STATE_ZERO } else { 0 };
            match out.last_mut() {
                Some(e) if e.flags == flags => e.len += stop - pos,
                _ => out.push(Extent {
                    len: stop - pos,
                    flags,
                }),
            }
            pos = stop;
        }
        Ok(out)
    }
}
