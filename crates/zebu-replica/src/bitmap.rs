//! Sparse in-memory allocation bitmap of one layer: one bit per cluster, stored in 4096-cluster
//! chunks that exist only where something is allocated, so memory follows allocated data.

use std::collections::BTreeMap;

const WORDS: usize = 64;
/// Clusters covered by one chunk.
pub const CHUNK_CLUSTERS: u64 = (WORDS * 64) as u64;

/// A run of clusters `[start, start + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub len: u64,
}

impl Run {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

#[derive(Debug, Default, Clone)]
pub struct ClusterMap {
    chunks: BTreeMap<u64, Box<[u64; WORDS]>>,
    count: u64,
}

impl ClusterMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of allocated clusters.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn get(&self, c: u64) -> bool {
        let Some(ch) = self.chunks.get(&(c / CHUNK_CLUSTERS)) else {
            return false;
        };
        let i = (c % CHUNK_CLUSTERS) as usize;
        ch[i / 64] & (1 << (i % 64)) != 0
    }

    pub fn set(&mut self, c: u64) {
        let ch = self
            .chunks
            .entry(c / CHUNK_CLUSTERS)
            .or_insert_with(|| Box::new([0; WORDS]));
        let i = (c % CHUNK_CLUSTERS) as usize;
        let bit = 1u64 << (i % 64);
        if ch[i / 64] & bit == 0 {
            ch[i / 64] |= bit;
            self.count += 1;
        }
    }

    pub fn clear(&mut self, c: u64) {
        let key = c / CHUNK_CLUSTERS;
        let Some(ch) = self.chunks.get_mut(&key) else {
            return;
        };
        let i = (c % CHUNK_CLUSTERS) as usize;
        let bit = 1u64 << (i % 64);
        if ch[i / 64] & bit != 0 {
            ch[i / 64] &= !bit;
            self.count -= 1;
            if ch.iter().all(|w| *w == 0) {
                self.chunks.remove(&key);
            }
        }
    }

    pub fn apply(&mut self, run: Run, set: bool) {
        for c in run.start..run.end() {
            if set { self.set(c) } else { self.clear(c) }
        }
    }

    /// Drops every cluster at or above `limit`.
    pub fn truncate(&mut self, limit: u64) {
        let doomed: Vec<u64> = self
            .runs_in(limit, u64::MAX)
            .flat_map(|r| r.start..r.end())
            .collect();
        for c in doomed {
            self.clear(c);
        }
    }

    /// Allocated runs within `[from, to)`, in order. Cost follows the allocated chunks visited.
    pub fn runs_in(&self, from: u64, to: u64) -> impl Iterator<Item = Run> + '_ {
        let first_chunk = from / CHUNK_CLUSTERS;
        let mut cur: Option<Run> = None;
        let mut iter = self.chunks.range(first_chunk..).flat_map(move |(k, ch)| {
            let base = k * CHUNK_CLUSTERS;
            ch.iter().enumerate().flat_map(move |(wi, w)| {
                let mut w = *w;
                std::iter::from_fn(move || {
                    if w == 0 {
                        return None;
                    }
                    let b = w.trailing_zeros() as u64;
                    w &= w - 1;
                    Some(base + wi as u64 * 64 + b)
                })
            })
        });
        std::iter::from_fn(move || {
            loop {
                match iter.next() {
                    Some(c) if c < from => continue,
                    Some(c) if c >= to => {
                        return cur.take();
                    }
                    Some(c) => match cur.as_mut() {
                        Some(r) if r.end() == c => r.len += 1,
                        Some(_) => {
                            let out = cur.replace(Run { start: c, len: 1 });
                            return out;
                        }
                        None => cur = Some(Run { start: c, len: 1 }),
                    },
                    None => return cur.take(),
                }
            }
        })
    }

    /// All allocated runs.
    pub fn runs(&self) -> Vec<Run> {
        self.runs_in(0, u64::MAX).collect()
    }

    /// Approximate heap bytes used.
    pub fn memory_bytes(&self) -> usize {
        // Chunk payload plus a generous per-entry B-tree overhead.
        self.chunks.len() * (WORDS * 8 + 48)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        #[test]
        fn matches_a_set(ops in proptest::collection::vec((0u64..20_000, 1u64..300, any::<bool>()), 0..60),
                         from in 0u64..20_000, span in 0u64..20_000) {
            let mut m = ClusterMap::new();
            let mut s = BTreeSet::new();
            for (start, len, set) in ops {
                m.apply(Run { start, len }, set);
                for c in start..start + len {
                    if set { s.insert(c); } else { s.remove(&c); }
                }
            }
            prop_assert_eq!(m.count(), s.len() as u64);
            let to = from + span;
            let got: Vec<u64> = m.runs_in(from, to).flat_map(|r| r.start..r.end()).collect();
            let want: Vec<u64> = s.range(from..to).copied().collect();
            prop_assert_eq!(got, want);
            // Runs are maximal.
            let runs = m.runs();
            for w in runs.windows(2) {
                prop_assert!(w[0].end() < w[1].start);
            }
        }
    }
}
