//! Times deleting a snapshot of N clusters (4 KiB each, every other one) merged into a larger
//! head in steps of 16, as the replica server does: `cargo run --release -p zebu-replica
//! --example merge_cost -- 80000`.

use std::sync::Arc;

use zebu_replica::{CreateOptions, ReplicaStore, SnapshotSpec, StdVfs, Vfs};
use zebu_types::LayerId;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20000);
    let vfs: Arc<dyn Vfs> = Arc::new(StdVfs);
    let dir = std::env::temp_dir().join(format!("merge-cost-{}", std::process::id()));
    let cs = 4096u64;
    let opts = CreateOptions {
        size: (2 * n + 40) * cs,
        cluster_size: cs as u32,
        head: LayerId(1),
        base: None,
    };
    let mut st = ReplicaStore::create(vfs, &dir, opts)?;
    let buf = vec![7u8; cs as usize];
    for c in 0..n {
        st.write(2 * c * cs, &buf)?;
    }
    st.snapshot(&SnapshotSpec {
        name: "s".into(),
        new_head: LayerId(2),
        created: 0,
        user_created: true,
        in_sync: true,
    })?;
    // A head larger than the snapshot: the snapshot is merged up into it (not folded down).
    for c in 0..n + 10 {
        st.write((2 * c + 1) * cs, &buf)?;
    }
    st.delete_snapshot("s")?;
    let t = std::time::Instant::now();
    let mut steps = 0;
    while st.merge_step(16)? {
        steps += 1;
    }
    println!("{n} clusters: {steps} steps in {:?}", t.elapsed());
    drop(st);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
