//! Which offset of each partition may be committed: the lowest offset not yet
//! settled, or one past the highest received when all are settled.
//!
//! Settled means durably in the outbox with its dedup key, or dead-lettered.
//! Each assignment of a partition gets a new generation, so a settlement that
//! arrives after the partition was revoked (and maybe assigned again) is
//! ignored instead of moving the new owner's offsets.

use std::collections::{BTreeSet, HashMap};

pub type Tp = (String, i32);

#[derive(Debug, Default)]
struct Part {
    generation: u64,
    pending: BTreeSet<i64>,
    /// One past the highest offset received.
    next: Option<i64>,
    /// The last offset committed successfully.
    committed: Option<i64>,
}

impl Part {
    fn committable(&self) -> Option<i64> {
        self.pending.first().copied().or(self.next)
    }
}

#[derive(Debug, Default)]
pub struct Offsets {
    parts: HashMap<Tp, Part>,
    generations: u64,
}

impl Offsets {
    /// Starts tracking a newly assigned partition.
    pub fn assign(&mut self, tp: Tp) {
        self.generations += 1;
        self.parts.insert(tp, Part { generation: self.generations, ..Part::default() });
    }

    /// Stops tracking a revoked partition; returns the offset to commit for it
    /// if it moved since the last commit.
    pub fn revoke(&mut self, tp: &Tp) -> Option<i64> {
        let part = self.parts.remove(tp)?;
        part.committable().filter(|c| Some(*c) != part.committed)
    }

    /// Records a received message; returns the generation to settle it with.
    /// Generation 0 means "not ours": a message of a partition that is not
    /// assigned to us is still processed, but never moves a commit.
    pub fn received(&mut self, tp: &Tp, offset: i64) -> u64 {
        let Some(part) = self.parts.get_mut(tp) else {
            tracing::warn!(topic = %tp.0, partition = tp.1, offset, "message from a partition not assigned to us");
            return 0;
        };
        part.pending.insert(offset);
        part.next = Some(part.next.map_or(offset + 1, |n| n.max(offset + 1)));
        part.generation
    }

    /// Marks a message settled (ignored if its partition changed hands since).
    pub fn settled(&mut self, tp: &Tp, generation: u64, offset: i64) {
        if let Some(part) = self.parts.get_mut(tp).filter(|p| p.generation == generation) {
            part.pending.remove(&offset);
        }
    }

    /// Offsets that moved since they were last committed.
    pub fn to_commit(&self) -> Vec<(Tp, i64)> {
        self.parts
            .iter()
            .filter_map(|(tp, p)| p.committable().filter(|c| Some(*c) != p.committed).map(|c| (tp.clone(), c)))
            .collect()
    }

    /// Records a successful commit.
    pub fn committed(&mut self, tp: &Tp, offset: i64) {
        if let Some(p) = self.parts.get_mut(tp) {
            p.committed = Some(p.committed.map_or(offset, |c| c.max(offset)));
        }
    }

    /// Whether the partition is assigned to us.
    pub fn owns(&self, tp: &Tp) -> bool {
        self.parts.contains_key(tp)
    }

    /// How many partitions are assigned to us.
    pub fn assigned(&self) -> usize {
        self.parts.len()
    }

    /// Messages received but not settled, across partitions.
    pub fn unsettled(&self) -> usize {
        self.parts.values().map(|p| p.pending.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp() -> Tp {
        ("events".into(), 0)
    }

    #[test]
    fn commits_stop_at_the_lowest_unsettled_offset() {
        let mut o = Offsets::default();
        o.assign(tp());
        let g = (10..15).map(|off| o.received(&tp(), off)).last().expect("received");
        assert_eq!(o.to_commit(), vec![(tp(), 10)]);
        o.settled(&tp(), g, 11);
        o.settled(&tp(), g, 12);
        assert_eq!(o.to_commit(), vec![(tp(), 10)], "10 is still unsettled");
        o.settled(&tp(), g, 10);
        assert_eq!(o.to_commit(), vec![(tp(), 13)]);
        o.settled(&tp(), g, 14);
        o.settled(&tp(), g, 13);
        assert_eq!(o.to_commit(), vec![(tp(), 15)], "all settled: one past the highest");
        o.committed(&tp(), 15);
        assert!(o.to_commit().is_empty(), "nothing new to commit");
        assert_eq!(o.unsettled(), 0);
    }

    #[test]
    fn revoked_partitions_ignore_late_settlements() {
        let mut o = Offsets::default();
        o.assign(tp());
        let old = o.received(&tp(), 5);
        o.received(&tp(), 6);
        assert_eq!(o.revoke(&tp()), Some(5));
        o.assign(tp());
        let new = o.received(&tp(), 5);
        assert_ne!(old, new);
        o.settled(&tp(), old, 5);
        assert_eq!(o.to_commit(), vec![(tp(), 5)], "the old generation's settlement must not count");
        o.settled(&tp(), new, 5);
        assert_eq!(o.to_commit(), vec![(tp(), 6)]);
    }

    #[test]
    fn revoking_an_unmoved_partition_commits_nothing() {
        let mut o = Offsets::default();
        o.assign(tp());
        assert_eq!(o.revoke(&tp()), None);
        let g = o.received(&tp(), 0);
        o.settled(&tp(), g, 0);
        o.committed(&tp(), 1);
        assert_eq!(o.revoke(&tp()), None);
    }

    #[test]
    fn partitions_not_assigned_never_move_a_commit() {
        let mut o = Offsets::default();
        let g = o.received(&tp(), 7);
        assert_eq!(g, 0);
        o.settled(&tp(), g, 7);
        assert!(o.to_commit().is_empty());
    }
}
