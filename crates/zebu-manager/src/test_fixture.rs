//! A manager for policy tests: a redb store and a directory backup target (the `default`
//! target's URL) in a temporary directory, removed on drop.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::controller::Manager;
use crate::model::DEFAULT_TARGET;
use crate::store::RedbStore;

pub(crate) struct Fixture {
    pub m: Arc<Manager>,
    pub dir: PathBuf,
    pub target: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) async fn fixture(tag: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!(
        "zebu-{tag}-unit-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let store = Arc::new(RedbStore::open(&dir.join("store.redb")).expect("store"));
    let m = Manager::new(store, "t".into(), None).expect("manager");
    let target = dir.join("target");
    let url = format!("file://{}", target.display());
    m.update_target(DEFAULT_TARGET, Some(&url), None, BTreeMap::new(), false)
        .await
        .expect("set url");
    Fixture { m, dir, target }
}
