//! Scale benchmark of the manager: simulated nodes heartbeat over HTTP as real node agents do
//! (every 500 ms, or at once when the long-poll says there is work), report every replica
//! assigned to them as running, while volumes are created through the API. Prints create →
//! all replicas assigned latency, heartbeat latency (while creating and while idle), and the
//! manager's idle CPU when given its PID. Run by `bench/scale.sh`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::Mutex;
use zebu_manager::client::ApiClient;
use zebu_manager::model::{Assignments, DiskStatus, Heartbeat, ReplicaReport};

struct Args {
    api: String,
    token: String,
    nodes: usize,
    volumes: usize,
    replicas: u32,
    concurrency: usize,
    idle_secs: u64,
    pid: Option<u32>,
    /// Volumes created per second (0: as fast as the API takes them).
    rate: u64,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        api: "http://127.0.0.1:9500".into(),
        token: String::new(),
        nodes: 100,
        volumes: 10_000,
        replicas: 3,
        concurrency: 16,
        idle_secs: 20,
        pid: None,
        rate: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let val = it.next().with_context(|| format!("{flag} needs a value"))?;
        let num = || {
            val.parse::<u64>()
                .with_context(|| format!("{flag}: not a number: {val}"))
        };
        match flag.as_str() {
            "--api" => a.api = val.clone(),
            "--token-file" => {
                a.token = std::fs::read_to_string(&val)
                    .with_context(|| format!("--token-file {val}"))?
                    .trim()
                    .to_string()
            }
            "--nodes" => a.nodes = num()? as usize,
            "--volumes" => a.volumes = num()? as usize,
            "--replicas" => a.replicas = num()? as u32,
            "--concurrency" => a.concurrency = num()? as usize,
            "--idle-secs" => a.idle_secs = num()?,
            "--pid" => a.pid = Some(num()? as u32),
            "--rate" => a.rate = num()?,
            _ => bail!("unknown flag {flag}"),
        }
    }
    if a.token.is_empty() {
        bail!("--token-file is required");
    }
    Ok(a)
}

#[derive(Default)]
struct Shared {
    /// When each volume's create call returned.
    created: HashMap<String, Instant>,
    /// Replicas of each volume first seen assigned, and when the last of them was.
    assigned: HashMap<String, (u32, Instant)>,
    /// Heartbeat round trips, in microseconds, per phase.
    beats: Vec<u64>,
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

async fn node(
    api: ApiClient,
    name: String,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut running: Vec<ReplicaReport> = Vec::new();
    let mut seen: std::collections::HashSet<String> = Default::default();
    while !stop.load(Ordering::Relaxed) {
        let hb = Heartbeat {
            address: "127.0.0.1".into(),
            nbd_address: "127.0.0.1:10809".into(),
            disks: vec![DiskStatus {
                path: "/sim".into(),
                capacity: 16 << 40,
                available: 16 << 40,
                scheduled: 0,
            }],
            replicas: running.clone(),
            ..Default::default()
        };
        let t0 = Instant::now();
        let a: Assignments = api
            .post(&format!("/v1/nodes/{name}/heartbeat"), &hb)
            .await
            .with_context(|| format!("heartbeat of {name}"))?;
        let took = t0.elapsed();
        let now = Instant::now();
        {
            let mut s = shared.lock().await;
            s.beats.push(took.as_micros() as u64);
            for r in &a.replicas {
                if seen.insert(r.name.clone()) {
                    let e = s.assigned.entry(r.volume.clone()).or_insert((0, now));
                    e.0 += 1;
                    e.1 = now;
                }
            }
        }
        running = a
            .replicas
            .iter()
            .enumerate()
            .map(|(i, r)| ReplicaReport {
                name: r.name.clone(),
                address: format!("127.0.0.1:{}", 20000 + i),
                flush_seq: 0,
            })
            .collect();
        // As a node agent: the next beat after its interval, or when the manager has work.
        let _ = api
            .get::<serde_json::Value>(&format!(
                "/v1/nodes/{name}/wait?timeoutMs={}",
                zebu_node::HEARTBEAT.as_millis()
            ))
            .await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let api = ApiClient::new(&a.api, &a.token)?;
    let shared = Arc::new(Mutex::new(Shared::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut nodes = Vec::new();
    for i in 0..a.nodes {
        nodes.push(tokio::spawn(node(
            api.clone(),
            format!("sim{i:03}"),
            shared.clone(),
            stop.clone(),
        )));
    }
    // Every node registered before volumes arrive.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: Vec<serde_json::Value> = api.get("/v1/nodes").await?;
        if n.len() >= a.nodes {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {} simulated nodes registered after 60 s",
                n.len(),
                a.nodes
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t0 = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut creators = Vec::new();
    for _ in 0..a.concurrency {
        let (api, shared, next, n, replicas, rate) = (
            api.clone(),
            shared.clone(),
            next.clone(),
            a.volumes,
            a.replicas,
            a.rate,
        );
        creators.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                // Volume i is due at i / rate seconds after the start.
                if let Some(us) = (i as u64 * 1_000_000).checked_div(rate) {
                    let due = t0 + Duration::from_micros(us);
                    tokio::time::sleep_until(due.into()).await;
                }
                let name = format!("s{i:05}");
                let body =
                    serde_json::json!({"name": name, "size": 1u64 << 30, "replicas": replicas});
                let _: serde_json::Value = api.post("/v1/volumes", &body).await?;
                shared.lock().await.created.insert(name, Instant::now());
            }
        }));
    }
    for c in creators {
        c.await??;
    }
    let created_in = t0.elapsed();
    let creating_beats = std::mem::take(&mut shared.lock().await.beats);
    // Until every replica is assigned.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = {
            let s = shared.lock().await;
            s.assigned
                .values()
                .filter(|(n, _)| *n >= a.replicas)
                .count()
        };
        if done >= a.volumes {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {done} of {} volumes had all replicas assigned after 600 s",
                a.volumes
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_in = t0.elapsed();
    let mut lat: Vec<u64> = {
        let s = shared.lock().await;
        s.created
            .iter()
            .filter_map(|(v, c)| {
                s.assigned
                    .get(v)
                    .map(|(_, t)| t.saturating_duration_since(*c).as_millis() as u64)
            })
            .collect()
    };
    // Settled: the manager's last writes of the creation are done.
    tokio::time::sleep(Duration::from_secs(15)).await;
    shared.lock().await.beats.clear();
    let ticks0 = a.pid.and_then(cpu_ticks);
    tokio::time::sleep(Duration::from_secs(a.idle_secs)).await;
    let ticks1 = a.pid.and_then(cpu_ticks);
    let mut idle_beats = std::mem::take(&mut shared.lock().await.beats);
    stop.store(true, Ordering::Relaxed);
    let mut creating_beats = creating_beats;
    println!(
        "nodes {} volumes {} x {} replicas ({}): created in {:.1} s, all replicas assigned {:.1} s after the first create",
        a.nodes,
        a.volumes,
        a.replicas,
        if a.rate > 0 {
            format!("{} creates/s", a.rate)
        } else {
            "creates as fast as the API answers, 16 at a time".to_string()
        },
        created_in.as_secs_f64(),
        all_in.as_secs_f64()
    );
    println!(
        "create -> all replicas assigned: p50 {} ms, p99 {} ms, max {} ms",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        pct(&mut lat, 1.0)
    );
    println!(
        "heartbeat while creating ({}): p50 {:.2} ms, p99 {:.2} ms",
        creating_beats.len(),
        pct(&mut creating_beats, 0.5) as f64 / 1000.0,
        pct(&mut creating_beats, 0.99) as f64 / 1000.0
    );
    println!(
        "heartbeat while idle ({} in {} s): p50 {:.2} ms, p99 {:.2} ms",
        idle_beats.len(),
        a.idle_secs,
        pct(&mut idle_beats, 0.5) as f64 / 1000.0,
        pct(&mut idle_beats, 0.99) as f64 / 1000.0
    );
    if let (Some(t0), Some(t1)) = (ticks0, ticks1) {
        let hz = 100.0; // USER_HZ on Linux
        println!(
            "manager idle CPU: {:.1} % of one core",
            100.0 * (t1 - t0) as f64 / hz / a.idle_secs as f64
        );
    }
    for n in nodes {
        n.abort();
    }
    Ok(())
}
