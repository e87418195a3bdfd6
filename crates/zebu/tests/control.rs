//! Control-plane tests with real processes: the quickstart lifecycle through the CLI, bad input
//! through the API, and node failures across three node agents and a manager.
//!
//! Over 800 lines on purpose: one test binary for the control-plane scenarios, which share their chaos helpers.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use serde_json::{Value, json};
use zebu_manager::client::ApiClient;

#[test]
fn quickstart_volume_lifecycle() {
    let tmp = TempDir::new("quick");
    let data = tmp.path().join("zebu-data");
    let srv = Server::start(&data);
    // The token file is private.
    let mode = std::fs::metadata(data.join("api-token"))
        .expect("token")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    srv.cli(&[
        "volume",
        "create",
        "v1",
        "--size",
        "1GiB",
        "--replicas",
        "3",
        "--wait",
    ]);
    let uri = srv.cli(&["volume", "attach", "v1"]);
    let uri = uri.trim();
    assert_eq!(
        uri.lines().count(),
        1,
        "attach prints the URI alone: {uri:?}"
    );
    let out = must(
        "qemu-io",
        &["-f", "raw", uri, "-c", "write -P 0x5a 0 2M", "-c", "flush"],
    );
    assert!(!out.contains("failed"), "{out}");
    let src = tmp.path().join("in.img");
    let back = tmp.path().join("out.img");
    must(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", src.display()),
            "bs=1M",
            "count=64",
            "status=none",
        ],
    );
    must("nbdcopy", &[src.to_str().expect("utf8"), uri]);
    must("nbdcopy", &[uri, back.to_str().expect("utf8")]);
    let got = std::fs::read(&back).expect("read back");
    assert_eq!(
        blake3::hash(&got[..64 << 20]).to_hex().to_string(),
        file_hash(&src)
    );
    // JSON fields scripts rely on.
    let v = json_of(&srv.cli(&["volume", "get", "v1", "-o", "json"]));
    assert_eq!(v["metadata"]["name"], "v1");
    assert_eq!(v["spec"]["size"], 1u64 << 30);
    assert_eq!(v["spec"]["replicas"], 3);
    assert_eq!(v["status"]["state"], "attached");
    assert_eq!(v["status"]["nbdUri"], uri);
    let reps = json_of(&srv.cli(&["replica", "list", "--volume", "v1", "-o", "json"]));
    assert_eq!(reps.as_array().map(Vec::len), Some(3));
    wait_for("all replicas RW and the volume healthy", 60, || {
        let v = json_of(&srv.cli(&["volume", "get", "v1", "-o", "json"]));
        (v["status"]["robustness"] == "healthy").then_some(())
    });
    // Metrics: the manager's and the built-in node's, with the I/O just done.
    let (st, body) = raw_http(
        srv.api(),
        &format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            srv.token
        ),
    );
    assert_eq!(st, 200);
    for needle in [
        "zebu_reconcile_total",
        "# TYPE zebu_volume_io_latency_seconds histogram",
        "zebu_volume_io_latency_seconds_bucket{volume=\"v1\",op=\"write\",le=\"+Inf\"}",
        "zebu_engine_replica_mode{volume=\"v1\"",
        "zebu_engine_rebuild_bytes{volume=\"v1\"",
    ] {
        assert!(body.contains(needle), "metrics lack {needle}:\n{body}");
    }
    let writes: u64 = body
        .lines()
        .find(|l| l.starts_with("zebu_volume_io_bytes_total{volume=\"v1\",op=\"write\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(writes >= 66 << 20, "write bytes counted: {writes}");
    // Snapshots through the CLI; deleting one keeps the volume's data as it is.
    must(
        "qemu-io",
        &["-f", "raw", uri, "-c", "write -P 0x11 8M 1M", "-c", "flush"],
    );
    assert_eq!(
        srv.cli(&["snapshot", "create", "v1", "--name", "s1"])
            .trim(),
        "s1"
    );
    must(
        "qemu-io",
        &[
            "-f",
            "raw",
            uri,
            "-c",
            "write -P 0x22 8M 512k",
            "-c",
            "flush",
        ],
    );
    let list = json_of(&srv.cli(&["snapshot", "list", "v1", "-o", "json"]));
    let s1 = list
        .as_array()
        .and_then(|l| l.iter().find(|i| i["name"] == "s1"))
        .cloned()
        .expect("s1 listed");
    assert_eq!(s1["userCreated"], true);
    assert!(
        s1["size"].as_u64().unwrap_or(0) > 0 && s1["created"].as_u64().unwrap_or(0) > 0,
        "{s1}"
    );
    let (ok, _, err) = zebu_cli(
        srv.api(),
        &srv.token,
        &["snapshot", "create", "v1", "--name", "Bad/Name"],
    );
    assert!(
        !ok && err.contains("invalid name") && err.lines().count() == 1,
        "{err}"
    );
    srv.cli(&["snapshot", "delete", "v1", "s1"]);
    let list = json_of(&srv.cli(&["snapshot", "list", "v1", "-o", "json"]));
    assert!(
        !list
            .as_array()
            .is_some_and(|l| l.iter().any(|i| i["name"] == "s1")),
        "{list}"
    );
    let out = must(
        "qemu-io",
        &[
            "-f",
            "raw",
            uri,
            "-c",
            "read -P 0x22 8M 512k",
            "-c",
            "read -P 0x11 8704k 512k",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    // An attached volume cannot be deleted.
    let (ok, _, err) = zebu_cli(srv.api(), &srv.token, &["volume", "delete", "v1"]);
    assert!(
        !ok && err.contains("attached") && err.lines().count() == 1,
        "{err}"
    );
    srv.cli(&["volume", "detach", "v1"]);
    let rdir = data.join("node").join("replicas");
    assert_eq!(std::fs::read_dir(&rdir).expect("replicas dir").count(), 3);
    srv.cli(&["volume", "delete", "v1"]);
    assert_eq!(
        std::fs::read_dir(&rdir).expect("replicas dir").count(),
        0,
        "replica files left behind"
    );
    let (ok, _, err) = zebu_cli(srv.api(), &srv.token, &["volume", "get", "v1"]);
    assert!(!ok && err.contains("not found"), "{err}");
}

/// Sends a raw HTTP request; returns (status, body).
fn raw_http(api: &str, req: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(api).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(req.as_bytes()).expect("send");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (status, body)
}

fn volume_names(rt: &tokio::runtime::Runtime, api: &ApiClient) -> Vec<String> {
    let vols: Vec<Value> = rt.block_on(api.get("/v1/volumes")).expect("list");
    let mut v: Vec<String> = vols
        .iter()
        .filter_map(|v| v["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    v.sort();
    v
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let tmp = TempDir::new("bad");
    let srv = Server::start(&tmp.path().join("data"));
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let api = ApiClient::new(&format!("http://{}", srv.api()), &srv.token).expect("client");
    srv.cli(&[
        "volume",
        "create",
        "keep",
        "--size",
        "64MiB",
        "--replicas",
        "1",
        "--wait",
    ]);
    let before = volume_names(&rt, &api);
    // Health needs no token; everything else does.
    let (st, body) = raw_http(
        srv.api(),
        "GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(st, 200, "{body}");
    let (st, body) = raw_http(
        srv.api(),
        "GET /v1/volumes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(st, 401);
    assert_eq!(json_of(&body)["code"], "Unauthorized");
    let wrong = ApiClient::new(&format!("http://{}", srv.api()), "not-the-token").expect("client");
    let e = rt
        .block_on(wrong.post::<_, Value>("/v1/volumes", &json!({"name": "x", "size": 4096})))
        .expect_err("wrong token");
    assert_eq!(e.code(), Some("Unauthorized"));
    // A fixed list of bad requests, each a 4xx with a code and message.
    let cases: Vec<(Value, &str)> = vec![
        (json!({"name": "", "size": 1 << 20}), "InvalidName"),
        (
            json!({"name": "a".repeat(64), "size": 1 << 20}),
            "InvalidName",
        ),
        (json!({"name": "a/b", "size": 1 << 20}), "InvalidName"),
        (json!({"name": "..", "size": 1 << 20}), "InvalidName"),
        (json!({"name": "Upper", "size": 1 << 20}), "InvalidName"),
        (json!({"name": "ok", "size": 0}), "InvalidSize"),
        (json!({"name": "ok", "size": 1000}), "InvalidSize"),
        (json!({"name": "ok", "size": 1u64 << 50}), "InvalidSize"),
        (
            json!({"name": "ok", "size": 1 << 20, "replicas": 0}),
            "InvalidReplicas",
        ),
        (
            json!({"name": "ok", "size": 1 << 20, "replicas": 99}),
            "InvalidReplicas",
        ),
        (json!({"name": "ok", "size": -5}), "InvalidBody"),
        (json!({"name": "ok"}), "InvalidSize"),
        (json!({"name": "ok", "fromBackup": "nope"}), "NotFound"),
        (
            json!({"name": "ok", "fromBackup": "Bad_Name"}),
            "InvalidName",
        ),
        (
            json!({"name": "ok", "size": 4096, "backupTarget": "nope"}),
            "NotFound",
        ),
        (
            json!({"name": "ok", "size": 4096, "bogus": 1}),
            "InvalidBody",
        ),
        (json!({"name": "keep", "size": 1 << 20}), "AlreadyExists"),
    ];
    for (body, code) in &cases {
        let e = rt
            .block_on(api.post::<_, Value>("/v1/volumes", body))
            .expect_err("must be refused");
        match &e {
            zebu_manager::client::ClientError::Api {
                status,
                code: c,
                message,
            } => {
                assert!((400..500).contains(status), "{body}: status {status}");
                assert_eq!(c, code, "{body}: {message}");
                assert!(!message.is_empty());
            }
            other => panic!("{body}: {other}"),
        }
    }
    // Hard anti-affinity: more replicas than nodes.
    rt.block_on(api.put::<_, Value>(
        "/v1/settings/replica-soft-anti-affinity",
        &json!({"value": "false"}),
    ))
    .expect("set");
    let e = rt
        .block_on(api.post::<_, Value>(
            "/v1/volumes",
            &json!({"name": "two", "size": 1 << 20, "replicas": 2}),
        ))
        .expect_err("refused");
    assert_eq!(e.code(), Some("InsufficientNodes"));
    let e = rt
        .block_on(api.put::<_, Value>(
            "/v1/settings/replica-soft-anti-affinity",
            &json!({"value": "maybe"}),
        ))
        .expect_err("refused");
    assert_eq!(e.code(), Some("InvalidSetting"));
    // Unknown objects, unknown routes.
    for path in [
        "/v1/volumes/nope",
        "/v1/nodes/nope",
        "/v1/replicas/nope",
        "/v1/nothing",
    ] {
        let e = rt.block_on(api.get::<Value>(path)).expect_err("404");
        assert!(
            matches!(
                e,
                zebu_manager::client::ClientError::Api { status: 404, .. }
            ),
            "{path}: {e}"
        );
    }
    let e = rt
        .block_on(api.post::<_, Value>("/v1/volumes/nope/attach", &json!({})))
        .expect_err("404");
    assert_eq!(e.code(), Some("NotFound"));
    // Random names: every invalid one is refused, and nothing else changes.
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(64));
    runner
        .run(&"[a-zA-Z0-9./_ -]{0,70}", |name| {
            let valid = zebu_types::validate_name(&name).is_ok();
            if valid {
                return Ok(());
            }
            let r = rt.block_on(
                api.post::<_, Value>("/v1/volumes", &json!({"name": name, "size": 1 << 20})),
            );
            prop_assert!(r.is_err(), "{name:?} was accepted");
            prop_assert_eq!(
                r.err().and_then(|e| e.code().map(str::to_string)),
                Some("InvalidName".to_string())
            );
            Ok(())
        })
        .expect("property");
    assert_eq!(
        volume_names(&rt, &api),
        before,
        "bad input changed the volumes"
    );
}

#[test]
fn node_failure_delta_rebuild_and_replacement() {
    let tmp = TempDir::new("nodes");
    let (mgr, token) = manager_proc(&tmp.path().join("manager"), "127.0.0.1:0");
    let cli = |args: &[&str]| {
        let (ok, out, err) = zebu_cli(&mgr.addr, &token, args);
        assert!(ok, "zebu {args:?}: {err}");
        out
    };
    let mut nodes: Vec<Proc> = (1..=3)
        .map(|i| {
            node_proc(
                &format!("n{i}"),
                &mgr.addr,
                &token,
                &tmp.path().join(format!("n{i}")),
            )
        })
        .collect();
    cli(&["setting", "set", "node-down-timeout", "3"]);
    wait_for("three nodes up", 30, || {
        let n = json_of(&cli(&["node", "list", "-o", "json"]));
        (n.as_array()
            .map(|a| a.iter().filter(|x| x["status"]["state"] == "up").count())
            == Some(3))
        .then_some(())
    });
    cli(&[
        "volume",
        "create",
        "vol",
        "--size",
        "64MiB",
        "--replicas",
        "3",
        "--wait",
    ]);
    let reps = json_of(&cli(&["replica", "list", "--volume", "vol", "-o", "json"]));
    let mut placed: Vec<String> = reps
        .as_array()
        .expect("array")
        .iter()
        .map(|r| r["spec"]["node"].as_str().unwrap_or("").to_string())
        .collect();
    placed.sort();
    assert_eq!(placed, vec!["n1", "n2", "n3"], "one replica per node");
    let uri = cli(&["volume", "attach", "vol", "--node", "n1"])
        .trim()
        .to_string();
    let nbd_addr = uri
        .trim_start_matches("nbd://")
        .split('/')
        .next()
        .expect("addr")
        .to_string();
    wait_for("healthy", 60, || {
        (json_of(&cli(&["volume", "get", "vol", "-o", "json"]))["status"]["robustness"]
            == "healthy")
            .then_some(())
    });
    let rt = tokio::runtime::Runtime::new().expect("rt");
    const BLK: usize = 64 * 1024;
    let mut acked: std::collections::HashMap<u64, u64> = Default::default();
    let mut c = rt
        .block_on(zebu_nbd::client::NbdClient::connect(&nbd_addr, "vol"))
        .expect("nbd");
    let mut tag = 0u64;
    let mut write = |c: &mut zebu_nbd::client::NbdClient,
                     n: u64,
                     acked: &mut std::collections::HashMap<u64, u64>| {
        for _ in 0..n {
            tag += 1;
            let blk = (tag * 7919) % 1024;
            rt.block_on(c.write(blk * BLK as u64, &block_data(blk, tag, BLK), false))
                .expect("write");
            acked.insert(blk, tag);
        }
    };
    // Fill the volume, so a full rebuild would copy 64 MiB.
    for blk in 0..1024u64 {
        rt.block_on(c.write(blk * BLK as u64, &block_data(blk, 0, BLK), false))
            .expect("fill");
        acked.insert(blk, 0);
    }
    rt.block_on(c.flush()).expect("flush");
    // SIGKILL n3 under writes: the volume turns degraded, I/O goes on.
    nodes[2].kill();
    write(&mut c, 40, &mut acked);
    wait_for("degraded", 30, || {
        (json_of(&cli(&["volume", "get", "vol", "-o", "json"]))["status"]["robustness"]
            == "degraded")
            .then_some(())
    });
    write(&mut c, 40, &mut acked);
    // Back within the wait: its replica is reused by a delta rebuild.
    nodes[2] = node_proc("n3", &mgr.addr, &token, &tmp.path().join("n3"));
    // `volume wait` follows the rebuild and returns once the volume is healthy.
    let (ok, out, err) = zebu_cli(
        &mgr.addr,
        &token,
        &["volume", "wait", "vol", "--timeout", "120"],
    );
    assert!(ok && out.contains("healthy"), "volume wait: {out} {err}");
    wait_for("healthy again", 120, || {
        write(&mut c, 2, &mut acked);
        (json_of(&cli(&["volume", "get", "vol", "-o", "json"]))["status"]["robustness"]
            == "healthy")
            .then_some(())
    });
    // The rebuild's figures arrive with the node's next heartbeat.
    let n3 = wait_for("the rebuild figures of the returning replica", 30, || {
        let reps = json_of(&cli(&["replica", "list", "--volume", "vol", "-o", "json"]));
        let r = reps
            .as_array()?
            .iter()
            .find(|r| r["spec"]["node"] == "n3")?
            .clone();
        (r["status"]["rebuildTotal"].as_u64()? > 0).then_some(r)
    });
    let copied = n3["status"]["rebuildCopied"].as_u64().unwrap_or(u64::MAX);
    let skipped = n3["status"]["rebuildSkipped"].as_u64().unwrap_or(0);
    println!(
        "delta rebuild of the returning replica: copied {copied} bytes, skipped {skipped} bytes of a 64 MiB volume"
    );
    assert!(
        copied < 16 << 20,
        "the returning replica copied {copied} bytes; a delta rebuild copies far less than 64 MiB"
    );
    // Kept down past the wait: a new replica is built on a node with none of this volume.
    let _n4 = node_proc("n4", &mgr.addr, &token, &tmp.path().join("n4"));
    wait_for("n4 up", 30, || {
        // Not found until its first heartbeat.
        let (ok, out, _) = zebu_cli(&mgr.addr, &token, &["node", "get", "n4", "-o", "json"]);
        (ok && json_of(&out)["status"]["state"] == "up").then_some(())
    });
    cli(&["setting", "set", "replica-replenishment-wait-interval", "2"]);
    nodes[2].kill();
    wait_for("a replacement replica on n4, RW", 120, || {
        write(&mut c, 2, &mut acked);
        let reps = json_of(&cli(&["replica", "list", "--volume", "vol", "-o", "json"]));
        reps.as_array()?
            .iter()
            .any(|r| r["spec"]["node"] == "n4" && r["status"]["mode"] == "RW")
            .then_some(())
    });
    wait_for("healthy with the replacement", 60, || {
        (json_of(&cli(&["volume", "get", "vol", "-o", "json"]))["status"]["robustness"]
            == "healthy")
            .then_some(())
    });
    rt.block_on(c.flush()).expect("flush");
    for (blk, t) in &acked {
        let got = rt
            .block_on(c.read(blk * BLK as u64, BLK as u32))
            .expect("read");
        assert!(
            got == block_data(*blk, *t, BLK),
            "block {blk} lost write {t}"
        );
    }
    // The live replicas are byte-identical.
    let engines: Value = json_of(&cli(&["volume", "get", "vol", "-o", "json"]));
    let _ = engines;
    let api = ApiClient::new(&format!("http://{}", mgr.addr), &token).expect("client");
    let eng: Vec<Value> = rt.block_on(api.get("/v1/engines")).expect("engines");
    let generation = eng[0]["spec"]["generation"].as_u64().expect("generation");
    let reps = json_of(&cli(&["replica", "list", "--volume", "vol", "-o", "json"]));
    let mut hashes = Vec::new();
    for r in reps.as_array().expect("array") {
        if r["metadata"]["deletionRequested"].is_null() && r["status"]["mode"] == "RW" {
            let addr = r["status"]["address"].as_str().expect("address");
            hashes.push(rt.block_on(replica_hash(addr, "vol", generation, 64 << 20)));
        }
    }
    assert_eq!(hashes.len(), 3, "three RW replicas");
    assert!(hashes.iter().all(|h| h == &hashes[0]), "replicas differ");
}

/// The API fuzzed from its own OpenAPI document answers no 5xx.
#[test]
fn schemathesis_finds_no_server_errors() {
    let tmp = TempDir::new("fuzz");
    let srv = Server::start(&tmp.path().join("data"));
    let doc = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
    let out = std::process::Command::new("schemathesis")
        .current_dir(tmp.path())
        .args([
            "run",
            doc,
            "--url",
            &format!("http://{}", srv.api()),
            "-H",
            &format!("Authorization: Bearer {}", srv.token),
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "25",
            "--seed",
            "1",
            // Target creation touches the paths and endpoints it is given, and a node's long-poll
            // waits by design; neither is for random input.
            "--exclude-path-regex",
            "^/v1/backup-targets|/wait$",
        ])
        .env("NO_COLOR", "1")
        .output()
        .expect("schemathesis (the test command installs it with pip)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found failures:\n{text}");
    assert!(
        text.contains("passed") && !text.contains("Authentication failed"),
        "{text}"
    );
}

/// Waits until every volume settled: deleted ones gone, attached ones attached and healthy,
/// detached ones detached with all their replicas running.
fn converge(srv: &Server, what: &str) -> Vec<Value> {
    converge_with(&|a: &[&str]| srv.cli(a), what)
}

fn converge_with(cli: &dyn Fn(&[&str]) -> String, what: &str) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let settled = || {
        // Every replica running, none being deleted.
        let reps = json_of(&cli(&["replica", "list", "-o", "json"]));
        let reps_settled = reps.as_array()?.iter().all(|r| {
            r["metadata"]["deletionRequested"].is_null() && r["status"]["state"] == "running"
        });
        if !reps_settled {
            return None;
        }
        let vols = json_of(&cli(&["volume", "list", "-o", "json"]));
        let vols = vols.as_array()?.clone();
        let settled = vols.iter().all(|v| {
            if !v["metadata"]["deletionRequested"].is_null() {
                return false;
            }
            if v["spec"]["node"].is_null() {
                v["status"]["state"] == "detached"
            } else {
                v["status"]["state"] == "attached" && v["status"]["robustness"] == "healthy"
            }
        });
        settled.then_some(vols)
    };
    loop {
        if let Some(v) = settled() {
            return v;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "timed out after 90s waiting for {what}:\nvolumes {}\nreplicas {}\nengines {}",
                cli(&["volume", "list", "-o", "json"]),
                cli(&["replica", "list", "-o", "json"]),
                cli(&["node", "list", "-o", "json"]),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// No duplicated or orphaned replicas: each volume has exactly its replica count, every replica
/// belongs to a volume, and the replica directories on disk are exactly the replica objects.
fn check_replicas(srv: &Server, vols: &[Value]) {
    check_replicas_with(
        &|a: &[&str]| srv.cli(a),
        &[srv.data.join("node").join("replicas")],
        vols,
    )
}

fn check_replicas_with(
    cli: &dyn Fn(&[&str]) -> String,
    dirs: &[std::path::PathBuf],
    vols: &[Value],
) {
    let reps = json_of(&cli(&["replica", "list", "-o", "json"]));
    let reps = reps.as_array().expect("array");
    for v in vols {
        let name = v["metadata"]["name"].as_str().expect("name");
        let n = reps.iter().filter(|r| r["spec"]["volume"] == name).count() as u64;
        assert_eq!(
            Some(n),
            v["spec"]["replicas"].as_u64(),
            "volume {name} has {n} replicas"
        );
    }
    for r in reps {
        assert!(
            vols.iter()
                .any(|v| v["metadata"]["name"] == r["spec"]["volume"]),
            "orphaned replica object {r}"
        );
    }
    let mut on_disk: Vec<String> = dirs
        .iter()
        .flat_map(|d| {
            std::fs::read_dir(d)
                .map(|rd| {
                    rd.flatten()
                        .filter_map(|e| e.file_name().to_str().map(str::to_string))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .collect();
    on_disk.sort();
    let mut objects: Vec<String> = reps
        .iter()
        .filter_map(|r| r["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    objects.sort();
    assert_eq!(on_disk, objects, "replica directories and objects differ");
}

fn nbd_parts(uri: &str) -> (String, String) {
    let rest = uri.trim_start_matches("nbd://");
    let (addr, name) = rest.split_once('/').expect("nbd uri");
    (addr.to_string(), name.to_string())
}

/// Attached volumes hold the pattern last written and flushed to their first 256 KiB.
fn check_attached_data(
    rt: &tokio::runtime::Runtime,
    vols: &[Value],
    written: &mut std::collections::HashMap<String, u64>,
    step: u64,
) {
    written.retain(|k, _| vols.iter().any(|v| v["metadata"]["name"] == k.as_str()));
    for v in vols {
        let name = v["metadata"]["name"].as_str().expect("name").to_string();
        if let (Some(uri), Some(tag)) = (v["status"]["nbdUri"].as_str(), written.get(&name)) {
            let (addr, export) = nbd_parts(uri);
            let got = rt.block_on(async {
                let mut c = zebu_nbd::client::NbdClient::connect(&addr, &export)
                    .await
                    .expect("connect");
                c.read(0, 256 << 10).await.expect("read")
            });
            assert!(
                got == block_data(0, *tag, 256 << 10),
                "volume {name} lost its flushed data at step {step}"
            );
        }
    }
}

/// Attaches `vol` (on `node` when given), checks its old pattern and writes and flushes a new one.
fn attach_and_write(
    rt: &tokio::runtime::Runtime,
    cli: &dyn Fn(&[&str]) -> String,
    vol: &str,
    node: Option<&str>,
    written: &mut std::collections::HashMap<String, u64>,
    tag: u64,
) {
    let mut args = vec!["volume", "attach", vol];
    if let Some(n) = node {
        args.extend(["--node", n]);
    }
    let uri = cli(&args);
    let (addr, export) = nbd_parts(uri.trim());
    rt.block_on(async {
        let mut c = zebu_nbd::client::NbdClient::connect(&addr, &export)
            .await
            .expect("connect");
        if let Some(old) = written.get(vol) {
            let got = c.read(0, 256 << 10).await.expect("read");
            assert!(
                got == block_data(0, *old, 256 << 10),
                "volume {vol} lost its data while detached"
            );
        }
        c.write(0, &block_data(0, tag, 256 << 10), false)
            .await
            .expect("write");
        c.flush().await.expect("flush");
    });
    written.insert(vol.to_string(), tag);
}

/// SIGKILL of `zebu server` at random points of create/attach/detach/delete, 20 times: afterwards
/// no orphaned or duplicated replica, attached volumes come back attached, data intact.
#[test]
fn sigkill_server_during_volume_operations() {
    let tmp = TempDir::new("chaos");
    let data = tmp.path().join("data");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Volume -> tag of the last pattern written and flushed to its first 256 KiB.
    let mut written: std::collections::HashMap<String, u64> = Default::default();
    let mut created = 0u32;
    let mut ops = Vec::new();
    for i in 0..20u64 {
        let srv = Server::start(&data);
        let vols = converge(&srv, &format!("convergence after restart {i}"));
        check_replicas(&srv, &vols);
        // Attached volumes came back attached, with their data.
        check_attached_data(&rt, &vols, &mut written, i);
        let names: Vec<String> = vols
            .iter()
            .filter_map(|v| v["metadata"]["name"].as_str().map(str::to_string))
            .collect();
        let attached: Vec<String> = vols
            .iter()
            .filter(|v| !v["spec"]["node"].is_null())
            .filter_map(|v| v["metadata"]["name"].as_str().map(str::to_string))
            .collect();
        let detached: Vec<String> = names
            .iter()
            .filter(|n| !attached.contains(n))
            .cloned()
            .collect();
        let pick = |l: &[String], r: u64| l[(r % l.len() as u64) as usize].clone();
        let choice = next() % 5;
        let op: (String, Vec<String>) = if names.len() < 2 || (choice == 0 && names.len() < 4) {
            created += 1;
            let n = format!("c{created}");
            (
                "create".into(),
                vec![
                    "volume".into(),
                    "create".into(),
                    n,
                    "--size".into(),
                    "16MiB".into(),
                    "--replicas".into(),
                    "2".into(),
                    "--wait".into(),
                ],
            )
        } else if (choice == 1 || choice == 2) && !detached.is_empty() {
            (
                "attach".into(),
                vec!["volume".into(), "attach".into(), pick(&detached, next())],
            )
        } else if choice == 3 && !attached.is_empty() {
            (
                "detach".into(),
                vec!["volume".into(), "detach".into(), pick(&attached, next())],
            )
        } else if !detached.is_empty() {
            (
                "delete".into(),
                vec!["volume".into(), "delete".into(), pick(&detached, next())],
            )
        } else {
            (
                "detach".into(),
                vec!["volume".into(), "detach".into(), pick(&attached, next())],
            )
        };
        // An attached volume gets a fresh pattern before the kill.
        if op.0 == "attach" {
            let vol = op.1[2].clone();
            attach_and_write(
                &rt,
                &|a: &[&str]| srv.cli(a),
                &vol,
                None,
                &mut written,
                i + 1,
            );
        }
        let delay = next() % 700;
        let mut cli = std::process::Command::new(ZEBU)
            .args(&op.1)
            .env("ZEBU_API", format!("http://{}", srv.api()))
            .env("ZEBU_TOKEN", &srv.token)
            .env("ZEBU_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("cli");
        std::thread::sleep(Duration::from_millis(delay));
        ops.push(format!(
            "{} {} (kill after {delay} ms)",
            op.0,
            op.1.get(2).cloned().unwrap_or_default()
        ));
        drop(srv); // SIGKILL
        let _ = cli.kill();
        let _ = cli.wait();
    }
    let srv = Server::start(&data);
    let vols = converge(&srv, "final convergence");
    check_replicas(&srv, &vols);
    println!("operations: {ops:?}");
}

/// SIGKILL of the manager or of a node at random points of create/attach/detach/delete, 20 times,
/// with two nodes: afterwards no orphaned or duplicated replica, attached volumes come back
/// attached, data intact.
#[test]
fn sigkill_manager_and_nodes_during_volume_operations() {
    let tmp = TempDir::new("chaos2");
    let mdir = tmp.path().join("manager");
    let start_mgr = |port: &str| manager_proc(&mdir, port).0;
    let (mut mgr, token) = manager_proc(&mdir, "127.0.0.1:0");
    let api_port = mgr.addr.clone();
    let node_dirs: Vec<std::path::PathBuf> =
        (1..=2).map(|i| tmp.path().join(format!("n{i}"))).collect();
    let mut nodes: Vec<Proc> = (0..2)
        .map(|i| node_proc(&format!("n{}", i + 1), &api_port, &token, &node_dirs[i]))
        .collect();
    let cli = |args: &[&str]| {
        let (ok, out, err) = zebu_cli(&api_port, &token, args);
        assert!(ok, "zebu {args:?}: {err}");
        out
    };
    let node_ready = |name: &str, nbd: &str| {
        // Not found until its first heartbeat; the manager may be restarting.
        let (ok, out, _) = zebu_cli(&api_port, &token, &["node", "get", name, "-o", "json"]);
        let n = if ok { json_of(&out) } else { return None };
        (n["status"]["state"] == "up" && n["status"]["nbdAddress"] == nbd).then_some(())
    };
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut written: std::collections::HashMap<String, u64> = Default::default();
    let mut created = 0u32;
    let mut ops = Vec::new();
    let dirs: Vec<std::path::PathBuf> = node_dirs.iter().map(|d| d.join("replicas")).collect();
    for i in 0..20u64 {
        for (k, n) in nodes.iter().enumerate() {
            wait_for("node up with its current NBD address", 30, || {
                node_ready(&format!("n{}", k + 1), &n.addr)
            });
        }
        let vols = converge_with(&cli, &format!("convergence before step {i}"));
        check_replicas_with(&cli, &dirs, &vols);
        check_attached_data(&rt, &vols, &mut written, i);
        let names: Vec<String> = vols
            .iter()
            .filter_map(|v| v["metadata"]["name"].as_str().map(str::to_string))
            .collect();
        let attached: Vec<String> = vols
            .iter()
            .filter(|v| !v["spec"]["node"].is_null())
            .filter_map(|v| v["metadata"]["name"].as_str().map(str::to_string))
            .collect();
        let detached: Vec<String> = names
            .iter()
            .filter(|n| !attached.contains(n))
            .cloned()
            .collect();
        let pick = |l: &[String], r: u64| l[(r % l.len() as u64) as usize].clone();
        let choice = next() % 5;
        let args: Vec<String> = if names.len() < 2 || (choice == 0 && names.len() < 4) {
            created += 1;
            vec![
                "volume".into(),
                "create".into(),
                format!("c{created}"),
                "--size".into(),
                "16MiB".into(),
                "--replicas".into(),
                "2".into(),
                "--wait".into(),
            ]
        } else if choice <= 2 && !detached.is_empty() {
            let vol = pick(&detached, next());
            let node = format!("n{}", 1 + next() % 2);
            attach_and_write(&rt, &cli, &vol, Some(&node), &mut written, i + 1);
            vec!["volume".into(), "get".into(), vol]
        } else if choice == 3 && !attached.is_empty() {
            vec!["volume".into(), "detach".into(), pick(&attached, next())]
        } else if !detached.is_empty() {
            vec!["volume".into(), "delete".into(), pick(&detached, next())]
        } else {
            vec!["volume".into(), "detach".into(), pick(&attached, next())]
        };
        let mut child = std::process::Command::new(ZEBU)
            .args(&args)
            .env("ZEBU_API", format!("http://{api_port}"))
            .env("ZEBU_TOKEN", &token)
            .env("ZEBU_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("cli");
        let delay = next() % 700;
        std::thread::sleep(Duration::from_millis(delay));
        let victim = next() % 3;
        if victim == 0 {
            mgr.kill();
            let _ = child.kill();
            let _ = child.wait();
            mgr = start_mgr(&api_port);
        } else {
            let k = (victim - 1) as usize;
            nodes[k].kill();
            nodes[k] = node_proc(&format!("n{}", k + 1), &api_port, &token, &node_dirs[k]);
            let _ = child.wait();
        }
        ops.push(format!(
            "{} {} (kill {} after {delay} ms)",
            args[1],
            args[2],
            ["manager", "n1", "n2"][victim as usize]
        ));
    }
    let vols = converge_with(&cli, "final convergence");
    check_replicas_with(&cli, &dirs, &vols);
    println!("operations: {ops:?}");
}
