//! Which rows a shard scores: a deterministic, disjoint split of the input by row group.
//!
//! Every shard lists the same files in the same (sorted) order and numbers their row groups
//! globally; row group `k` belongs to shard `k mod shards`. Round-robin rather than
//! contiguous ranges, so a shard that draws a large file does not draw all of it. Together
//! the shards cover every row group exactly once, whatever the shard count.

/// One row group of one input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// Index of the file in the sorted listing.
    pub file: usize,
    /// The row group inside the file.
    pub row_group: usize,
    /// Rows in it.
    pub rows: u64,
}

/// The units of `files` (row counts per row group, in listing order) that shard `index` of
/// `shards` scores.
pub fn assign(files: &[Vec<u64>], shards: usize, index: usize) -> Vec<Unit> {
    let shards = shards.max(1);
    files
        .iter()
        .enumerate()
        .flat_map(|(file, groups)| {
            groups
                .iter()
                .enumerate()
                .map(move |(row_group, &rows)| Unit {
                    file,
                    row_group,
                    rows,
                })
        })
        .enumerate()
        .filter(|(k, _)| k % shards == index)
        .map(|(_, unit)| unit)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn shards_cover_every_row_group_exactly_once() {
        let files = vec![vec![10, 10, 5], vec![7], vec![], vec![3, 3, 3, 3]];
        let total: u64 = files.iter().flatten().sum();
        for shards in 1..=9 {
            let mut seen = HashSet::new();
            let mut rows = 0;
            for index in 0..shards {
                for unit in assign(&files, shards, index) {
                    assert!(seen.insert((unit.file, unit.row_group)), "{unit:?} twice");
                    rows += unit.rows;
                }
            }
            assert_eq!(seen.len(), 8, "{shards} shards");
            assert_eq!(rows, total);
        }
    }

    #[test]
    fn the_split_is_deterministic_and_round_robin() {
        let files = vec![vec![1, 1, 1, 1], vec![1, 1]];
        let shard1 = assign(&files, 2, 1);
        assert_eq!(shard1, assign(&files, 2, 1));
        let picked: Vec<(usize, usize)> = shard1.iter().map(|u| (u.file, u.row_group)).collect();
        assert_eq!(picked, vec![(0, 1), (0, 3), (1, 1)]);
        assert!(
            assign(&files, 8, 7).is_empty(),
            "more shards than row groups: some idle"
        );
    }
}
