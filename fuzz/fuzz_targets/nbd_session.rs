//! Fuzzes the NBD server with arbitrary client bytes: handshake, option parsing and request
//! parsing against an in-memory export. It must never panic and always finish.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zebu_nbd::mem::MemDevice;
use zebu_nbd::{Exports, handle_client};

fuzz_target!(|data: &[u8]| {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return;
    };
    rt.block_on(async {
        let ex = Arc::new(Exports::new());
        ex.insert("mem", Arc::new(MemDevice::new(65536)));
        let (client, server) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(handle_client(server, ex));
        let (mut r, mut w) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut sink = vec![0u8; 65536];
            while let Ok(n) = r.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        });
        let _ = w.write_all(data).await;
        let _ = w.shutdown().await;
        drop(w);
        let _ = task.await;
        drain.abort();
    });
});
