//! NBD protocol tests: real clients (qemu-io, nbdinfo) against an in-memory export, raw-socket
//! checks of error replies, and random byte streams that must never panic the server.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zebu_nbd::mem::MemDevice;
use zebu_nbd::proto::*;
use zebu_nbd::{Exports, handle_client, serve};

fn start(rt: &tokio::runtime::Runtime, size: usize) -> u16 {
    rt.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        let ex = Arc::new(Exports::new());
        ex.insert("mem", Arc::new(MemDevice::new(size)));
        ex.insert("other", Arc::new(MemDevice::new(4096)));
        tokio::spawn(serve(l, ex));
        port
    })
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn real_clients_round_trip() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let port = start(&rt, 8 << 20);
    let uri = format!("nbd://127.0.0.1:{port}/mem");
    let (ok, out) = run("nbdinfo", &["--json", &uri]);
    assert!(ok, "{out}");
    assert!(out.contains("\"export-size\": 8388608"), "{out}");
    assert!(out.contains("\"can_multi_conn\": true"), "{out}");
    let (ok, out) = run("nbdinfo", &["--list", &format!("nbd://127.0.0.1:{port}")]);
    assert!(ok && out.contains("mem") && out.contains("other"), "{out}");
    // Patterns, unaligned I/O, zeroing and discard through qemu's client.
    let (ok, out) = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 4097 5000",
            "-c",
            "read -P 0xab 0 4097",
            "-c",
            "read -P 0xcd 4097 5000",
            "-c",
            "write -z 2M 1M",
            "-c",
            "read -P 0 2M 1M",
            "-c",
            "write -P 0x11 3M 64k",
            "-c",
            "discard 3M 64k",
            "-c",
            "read -P 0 3M 64k",
            "-c",
            "write -P 0x22 -f 7M 64k",
            "-c",
            "flush",
            "-c",
            "read -P 0x22 7M 64k",
        ],
    );
    assert!(ok && !out.contains("Pattern verification failed"), "{out}");
    // base:allocation reaches the client.
    let (ok, out) = run("nbdinfo", &["--map", &uri]);
    assert!(ok, "{out}");
    assert!(out.contains("data") && out.contains("hole"), "{out}");
    // An unknown export is refused with a clear error.
    let (ok, out) = run("nbdinfo", &[&format!("nbd://127.0.0.1:{port}/nope")]);
    assert!(!ok, "{out}");
}

async fn raw_go(port: u16, name: &str, structured: bool) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).await.expect("hello");
    assert_eq!(
        u64::from_be_bytes(hello[..8].try_into().expect("8")),
        NBDMAGIC
    );
    s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
        .await
        .expect("flags");
    if structured {
        send_opt(&mut s, OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(read_opt_reply(&mut s).await.0, REP_ACK);
    }
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    send_opt(&mut s, OPT_GO, &d).await;
    loop {
        let (kind, _) = read_opt_reply(&mut s).await;
        if kind == REP_ACK {
            return s;
        }
        assert_eq!(kind, REP_INFO);
    }
}

async fn send_opt(s: &mut TcpStream, opt: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.expect("send option");
}

async fn read_opt_reply(s: &mut TcpStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.expect("option reply");
    let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
    let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).await.expect("option data");
    (kind, d)
}

async fn request(s: &mut TcpStream, kind: u16, cookie: u64, offset: u64, len: u32) {
    let mut b = Vec::new();
    b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    s.write_all(&b).await.expect("request");
}

async fn simple_reply(s: &mut TcpStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).await.expect("reply");
    assert_eq!(
        u32::from_be_bytes(h[..4].try_into().expect("4")),
        SIMPLE_REPLY_MAGIC
    );
    (
        u32::from_be_bytes(h[4..8].try_into().expect("4")),
        u64::from_be_bytes(h[8..16].try_into().expect("8")),
    )
}

#[test]
fn out_of_range_and_malformed_requests() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let port = start(&rt, 1 << 20);
    rt.block_on(async {
        let mut s = raw_go(port, "mem", false).await;
        request(&mut s, CMD_READ, 1, (1 << 20) - 512, 4096).await;
        assert_eq!(simple_reply(&mut s).await, (EINVAL, 1));
        request(&mut s, CMD_WRITE_ZEROES, 2, 1 << 20, 512).await;
        assert_eq!(simple_reply(&mut s).await, (ENOSPC, 2));
        request(&mut s, CMD_TRIM, 3, u64::MAX - 10, 512).await;
        assert_eq!(simple_reply(&mut s).await, (EINVAL, 3));
        request(&mut s, 77, 4, 0, 0).await;
        assert_eq!(simple_reply(&mut s).await, (EINVAL, 4));
        // Block status without a negotiated context.
        request(&mut s, CMD_BLOCK_STATUS, 5, 0, 4096).await;
        assert_eq!(simple_reply(&mut s).await, (EINVAL, 5));
        // A good read still works on the same connection.
        request(&mut s, CMD_READ, 6, 0, 512).await;
        assert_eq!(simple_reply(&mut s).await, (0, 6));
        let mut data = [1u8; 512];
        s.read_exact(&mut data).await.expect("data");
        assert!(data.iter().all(|b| *b == 0));
        // Garbage instead of a request header: the server closes the connection.
        s.write_all(&[0xde; 28]).await.expect("garbage");
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("server must close")
            .unwrap_or(0);
        assert_eq!(n, 0);

        // Unknown export in GO: an error reply, then the handshake continues.
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).await.expect("hello");
        s.write_all(&CLIENT_FIXED_NEWSTYLE.to_be_bytes())
            .await
            .expect("flags");
        let mut d = Vec::new();
        d.extend_from_slice(&4u32.to_be_bytes());
        d.extend_from_slice(b"nope");
        d.extend_from_slice(&0u16.to_be_bytes());
        send_opt(&mut s, OPT_GO, &d).await;
        assert_eq!(read_opt_reply(&mut s).await.0, REP_ERR_UNKNOWN);
        // A malformed GO payload.
        send_opt(&mut s, OPT_GO, &[0, 0, 0, 99]).await;
        assert_eq!(read_opt_reply(&mut s).await.0, REP_ERR_INVALID);
        // An unsupported option.
        send_opt(&mut s, 200, &[]).await;
        assert_eq!(read_opt_reply(&mut s).await.0, REP_ERR_UNSUP);
        send_opt(&mut s, OPT_ABORT, &[]).await;
        assert_eq!(read_opt_reply(&mut s).await.0, REP_ACK);
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Random bytes after a valid or invalid prefix never panic the server and always end.
    #[test]
    fn random_streams_never_panic(prefix in 0usize..3, junk in proptest::collection::vec(any::<u8>(), 0..600)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async move {
            let ex = Arc::new(Exports::new());
            ex.insert("mem", Arc::new(MemDevice::new(65536)));
            let (client, server) = tokio::io::duplex(1 << 20);
            let task = tokio::spawn(handle_client(server, ex));
            let (mut cr, mut cw) = tokio::io::split(client);
            let reader = tokio::spawn(async move {
                let mut sink = vec![0u8; 65536];
                while let Ok(n) = cr.read(&mut sink).await { if n == 0 { break; } }
            });
            let mut bytes = Vec::new();
            if prefix >= 1 {
                bytes.extend_from_slice(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
            }
            if prefix >= 2 {
                let mut d = Vec::new();
                d.extend_from_slice(&3u32.to_be_bytes());
                d.extend_from_slice(b"mem");
                d.extend_from_slice(&0u16.to_be_bytes());
                bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
                bytes.extend_from_slice(&OPT_GO.to_be_bytes());
                bytes.extend_from_slice(&(d.len() as u32).to_be_bytes());
                bytes.extend_from_slice(&d);
            }
            bytes.extend_from_slice(&junk);
            let _ = cw.write_all(&bytes).await;
            let _ = cw.shutdown().await;
            drop(cw);
            let r = tokio::time::timeout(Duration::from_secs(10), task).await;
            assert!(r.is_ok(), "server did not finish");
            assert!(r.expect("finished").is_ok(), "server task panicked");
            reader.abort();
        });
    }
}
