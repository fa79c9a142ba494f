//! The fingerprint index of a batch run: per input row group, the (entity, features
//! fingerprint) pairs the run scored, stored beside the generation
//! ([`millrace_crds::keys::Keyspace::fingerprint_index`]) with the batch TTL.
//!
//! An incremental run reads one index per row group (one `GET` of 16 bytes per row) and
//! decides every row whose entity is in it without reading its prediction: the same
//! fingerprint is unchanged (neither read nor written), another is changed (rescored; the
//! write expects a value with the old fingerprint, which is how a duplicate id is still
//! caught). Only rows the index does not know (new entities, or a row group laid out anew)
//! are read back and compared with the fingerprint inside their stored value, as without an
//! index. Every run writes the index of each row group it scored, with the digest of the
//! group's raw bytes and the version of the file they were read from ([`super::digest`]):
//! an incremental run that finds the file's version unchanged carries all the group's rows
//! without reading it; one that finds its digest unchanged, without decoding it.
//!
//! The index is trusted: a row it vouches for is not read. Predictions are evicted (or
//! expire) a bucket at a time, and the TTL refresh at the start of every incremental run
//! finds such buckets, whose entities the run's last shard then scores again
//! ([`super::repair`]). That trust is only safe if an index never runs ahead of the
//! predictions it describes, so a row group's index is written only once every prediction
//! write of that group has been acknowledged ([`IndexGate`]): a run that fails midway leaves
//! the old index, whose stale fingerprints make the next run rescore those rows, never a new
//! index over old values.
//!
//! Lookups go by position first: the rows of an unchanged layout come in the order the index
//! was written, so row *k* of a group is usually pair *k*; only when that pair names another
//! entity is a hash map of the whole group built.

use std::collections::HashMap;

use super::scoring::Group;
use super::writer::PredictionWriter;

/// The first byte of an encoded index: its format. 3: the row group's content digest and
/// the token of the file version it was read from ([`super::digest`]), then fingerprints
/// of [`millrace_crds::keys::features_fingerprint`]'s version 2. Format 2 (the same
/// fingerprints, neither digest nor token) still reads, so its rows are decoded and compared
/// as before; format 1 reads as empty (its rows go the exact way once).
const FORMAT: u8 = 3;

/// Refreshes the TTL of an index written from the file version whose token is `ARGV[1]` (8
/// bytes, little-endian) and returns how many rows it holds; -1, and nothing done, for any
/// other (or none). One round trip, reading 17 bytes of the index instead of all of it.
pub const KEEP_IF_READ_FROM: &str = "local head = redis.call('GETRANGE', KEYS[1], 0, 16) \
if string.len(head) == 17 and string.byte(head, 1) == tonumber(ARGV[3]) and string.sub(head, 10, 17) == ARGV[1] then \
redis.call('PEXPIRE', KEYS[1], ARGV[2]) \
return (redis.call('STRLEN', KEYS[1]) - 17) / 16 end \
return -1";

/// The format byte [`KEEP_IF_READ_FROM`] expects.
pub const FORMAT_WITH_VERSION: u8 = FORMAT;

/// Format 2: pairs without a digest.
const FORMAT_WITHOUT_DIGEST: u8 = 2;

/// The index's key of an entity: its [`millrace_crds::keys::entity_hash`] (which also
/// picks its bucket).
pub use millrace_crds::keys::entity_hash as id_hash;

/// What a run learned about one row group: where its bytes came from, what they were, and
/// the (entity hash, fingerprint) of every row it scored, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupIndex {
    /// [`super::digest::of_group`] of the group's column chunks.
    pub digest: u64,
    /// [`super::digest::of_version`] of the file version (ETag) the chunks were read from,
    /// under a condition that it had not changed; 0 when the store gives no version.
    pub version: u64,
    /// (entity hash, fingerprint) per scored row.
    pub pairs: Vec<(u64, u64)>,
}

/// An index as stored: the format byte, the digest, the version token, then 16 bytes per
/// pair.
pub fn encode(index: &GroupIndex) -> Vec<u8> {
    let mut out = Vec::with_capacity(17 + index.pairs.len() * 16);
    out.push(FORMAT);
    out.extend_from_slice(&index.digest.to_le_bytes());
    out.extend_from_slice(&index.version.to_le_bytes());
    for (id, fingerprint) in &index.pairs {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&fingerprint.to_le_bytes());
    }
    out
}

/// Stores `index` under `key` with the batch TTL (it must expire with the predictions it
/// describes).
pub async fn store(
    writer: &PredictionWriter,
    key: &str,
    index: &GroupIndex,
) -> Result<(), redis::RedisError> {
    writer.set_with_ttl(key, encode(index)).await
}

/// A stored index as read back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// The content digest (format 3).
    pub digest: Option<u64>,
    /// The version token (format 3, when the store gave one).
    pub version: Option<u64>,
    /// (entity hash, fingerprint) per scored row.
    pub pairs: Vec<(u64, u64)>,
}

/// A stored index; empty for anything that is not one (a missing, truncated or foreign
/// value makes every row of the group go the slow, exact way).
pub fn decode(bytes: &[u8]) -> Stored {
    let (digest, version, body) = match bytes.split_first() {
        Some((&FORMAT, rest)) if rest.len() >= 16 => {
            let (head, body) = rest.split_at(16);
            let (digest, version) = head.split_at(8);
            let version = word(version);
            (Some(word(digest)), (version != 0).then_some(version), body)
        }
        Some((&FORMAT_WITHOUT_DIGEST, body)) => (None, None, body),
        _ => return Stored::default(),
    };
    if body.len() % 16 != 0 {
        return Stored::default();
    }
    let pairs = body
        .chunks_exact(16)
        .map(|pair| {
            let (id, fingerprint) = pair.split_at(8);
            (word(id), word(fingerprint))
        })
        .collect();
    Stored {
        digest,
        version,
        pairs,
    }
}

/// The entities a stored index lists, if it is one of this release's format (every index
/// a run writes or keeps is); `None` for anything else, which says nothing reliable about
/// which entities its row group holds.
pub fn entities(bytes: &[u8]) -> Option<impl Iterator<Item = u64> + '_> {
    let body = match bytes.split_first() {
        Some((&FORMAT, rest)) if rest.len() >= 16 => &rest[16..],
        _ => return None,
    };
    (body.len() % 16 == 0).then(|| body.chunks_exact(16).map(|pair| word(&pair[..8])))
}

fn word(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().unwrap_or_default())
}

/// A row group's index as read: what fingerprint each known entity was scored on.
#[derive(Debug, Default)]
pub struct KnownIndex {
    /// The content digest of the row group it was written for (format 3).
    digest: Option<u64>,
    /// The version token of the file it was read from (format 3, when there was one).
    version: Option<u64>,
    pairs: Vec<(u64, u64)>,
    /// Entity hash → its pair, built only when the layout moved.
    by_id: Option<HashMap<u64, usize>>,
    /// Pairs already matched by a row of this run: a second row matching one is the same
    /// entity twice in the group.
    matched: Vec<bool>,
}

/// A row whose entity an earlier row of the same group already matched in the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenTwice;

impl KnownIndex {
    /// The index stored as `bytes` (empty when there is none).
    pub fn from_stored(bytes: Option<&[u8]>) -> Self {
        let Stored {
            digest,
            version,
            pairs,
        } = bytes.map(decode).unwrap_or_default();
        Self {
            digest,
            version,
            matched: vec![false; pairs.len()],
            pairs,
            by_id: None,
        }
    }

    /// Whether the index was written for a row group of content `digest`: then every row
    /// of the group is as it was scored, and nothing of it needs decoding.
    pub fn describes(&self, digest: u64) -> bool {
        self.digest == Some(digest)
    }

    /// Whether the index was written from the file version whose token is `version` (the
    /// file has not changed since, so neither has the group): then nothing of the group
    /// needs reading at all.
    pub fn read_from(&self, version: u64) -> bool {
        version != 0 && self.version == Some(version)
    }

    /// Its (entity hash, fingerprint) pairs, in the order written.
    pub fn pairs(&self) -> &[(u64, u64)] {
        &self.pairs
    }

    /// The entities it lists that no row of this run has matched: after the whole group,
    /// those gone from it (removed from the input, moved to another group, or skipped now).
    pub fn unmatched(&self) -> Vec<u64> {
        self.pairs
            .iter()
            .zip(&self.matched)
            .filter(|(_, matched)| !**matched)
            .map(|(&(id, _), _)| id)
            .collect()
    }

    /// The rows it knows (the group's scored rows when it was written).
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether it knows no row.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The fingerprint entity `id_hash` was scored on, if the index knows it; `position` is
    /// the row's place among the group's scored rows (where an unchanged layout has it).
    /// Fails when an earlier row of the group already matched the same entry: the input holds
    /// the entity twice (caught here, before either row is written, since their writes
    /// replace fields without reading them).
    pub fn lookup(&mut self, position: usize, id_hash: u64) -> Result<Option<u64>, SeenTwice> {
        let found = match self.pairs.get(position) {
            Some(&(id, _)) if id == id_hash => Some(position),
            _ if self.pairs.is_empty() => None,
            _ => {
                let pairs = &self.pairs;
                self.by_id
                    .get_or_insert_with(|| {
                        pairs
                            .iter()
                            .enumerate()
                            .map(|(k, &(id, _))| (id, k))
                            .collect()
                    })
                    .get(&id_hash)
                    .copied()
            }
        };
        let Some(k) = found else { return Ok(None) };
        if std::mem::replace(&mut self.matched[k], true) {
            return Err(SeenTwice);
        }
        Ok(Some(self.pairs[k].1))
    }
}

/// Holds each row group's new index until it may be written: when every batch of the group
/// has been decoded ([`IndexGate::decoded`]) and every prediction write of the group has
/// been acknowledged ([`IndexGate::opened`] / [`IndexGate::closed`]).
#[derive(Debug, Default)]
pub struct IndexGate {
    open: HashMap<Group, usize>,
    decoded: HashMap<Group, GroupIndex>,
}

impl IndexGate {
    /// A batch of `group` has work in flight (scoring, then writing).
    pub fn opened(&mut self, group: Group) {
        *self.open.entry(group).or_default() += 1;
    }

    /// A batch of `group` is done (its writes acknowledged, or nothing to write); returns the
    /// group's index if it may now be written.
    pub fn closed(&mut self, group: Group) -> Option<(Group, GroupIndex)> {
        if let Some(open) = self.open.get_mut(&group) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                self.open.remove(&group);
            }
        }
        self.release(group)
    }

    /// Every batch of `group` has been decoded; `index` is its new index. Returns it if it
    /// may be written now.
    pub fn decoded(&mut self, group: Group, index: GroupIndex) -> Option<(Group, GroupIndex)> {
        self.decoded.insert(group, index);
        self.release(group)
    }

    /// Whether an index is still held back.
    pub fn is_empty(&self) -> bool {
        self.decoded.is_empty()
    }

    fn release(&mut self, group: Group) -> Option<(Group, GroupIndex)> {
        if self.open.contains_key(&group) {
            return None;
        }
        self.decoded.remove(&group).map(|index| (group, index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(pairs: &[(u64, u64)]) -> GroupIndex {
        GroupIndex {
            digest: 42,
            version: 7,
            pairs: pairs.to_vec(),
        }
    }

    fn stored(digest: Option<u64>, version: Option<u64>, pairs: &[(u64, u64)]) -> Stored {
        Stored {
            digest,
            version,
            pairs: pairs.to_vec(),
        }
    }

    #[test]
    fn an_index_round_trips_and_garbage_decodes_to_nothing() {
        let pairs = vec![(id_hash("u1"), 7), (id_hash("u2"), 9)];
        assert_eq!(
            decode(&encode(&index(&pairs))),
            stored(Some(42), Some(7), &pairs)
        );
        let unversioned = GroupIndex {
            version: 0,
            ..index(&pairs)
        };
        assert_eq!(
            decode(&encode(&unversioned)),
            stored(Some(42), None, &pairs)
        );
        assert_eq!(decode(b""), Stored::default());
        assert_eq!(decode(&[FORMAT, 1, 2, 3]), Stored::default());
        assert_eq!(decode(&[9; 33]), Stored::default());
        let mut truncated = encode(&index(&pairs));
        truncated.pop();
        assert_eq!(decode(&truncated), Stored::default());
        // Format 2: the same pairs, neither digest nor version.
        let mut format_2 = vec![FORMAT_WITHOUT_DIGEST];
        format_2.extend_from_slice(&encode(&index(&pairs))[17..]);
        assert_eq!(decode(&format_2), stored(None, None, &pairs));
        let mut format_1 = format_2.clone();
        format_1[0] = 1;
        assert_eq!(
            decode(&format_1),
            Stored::default(),
            "format 1 holds other fingerprints"
        );
        assert_ne!(id_hash("u1"), id_hash("u2"));
    }

    #[test]
    fn only_an_index_of_format_3_vouches_for_a_whole_group() {
        let written = encode(&index(&[(1, 2)]));
        let known = KnownIndex::from_stored(Some(&written));
        assert!(known.describes(42) && known.read_from(7));
        assert!(!known.describes(43) && !known.read_from(8));
        assert!(!known.read_from(0), "no version is no proof");
        assert_eq!(known.len(), 1);
        let mut format_2 = vec![FORMAT_WITHOUT_DIGEST];
        format_2.extend_from_slice(&written[17..]);
        let old = KnownIndex::from_stored(Some(&format_2));
        assert!(!old.describes(42) && !old.read_from(7));
        assert!(!KnownIndex::from_stored(None).describes(0));
    }

    #[test]
    fn lookups_go_by_position_then_by_entity() {
        let (a, b, c) = (id_hash("a"), id_hash("b"), id_hash("c"));
        let stored = encode(&index(&[(a, 1), (b, 2), (c, 3)]));
        let mut known = KnownIndex::from_stored(Some(&stored));
        assert_eq!(known.lookup(1, b), Ok(Some(2)), "in place");
        assert!(known.by_id.is_none(), "no map for rows in place");
        assert_eq!(known.lookup(0, c), Ok(Some(3)), "moved");
        assert_eq!(known.lookup(7, a), Ok(Some(1)), "past the end");
        assert_eq!(known.lookup(0, id_hash("new")), Ok(None));
        let mut none = KnownIndex::from_stored(None);
        assert_eq!(none.lookup(0, a), Ok(None));
    }

    #[test]
    fn the_entities_no_row_matched_are_those_gone_from_the_group() {
        let (a, b, c) = (id_hash("a"), id_hash("b"), id_hash("c"));
        let stored = encode(&index(&[(a, 1), (b, 2), (c, 3)]));
        assert_eq!(
            entities(&stored).map(Iterator::collect::<Vec<_>>),
            Some(vec![a, b, c])
        );
        assert!(entities(&stored[..20]).is_none(), "truncated");
        assert!(
            entities(&[FORMAT_WITHOUT_DIGEST]).is_none(),
            "an older format"
        );
        let mut known = KnownIndex::from_stored(Some(&stored));
        assert_eq!(known.lookup(0, c), Ok(Some(3)));
        assert_eq!(known.lookup(1, a), Ok(Some(1)));
        assert_eq!(known.unmatched(), vec![b]);
    }

    #[test]
    fn an_entity_matched_twice_in_a_group_is_refused() {
        let (a, b) = (id_hash("a"), id_hash("b"));
        let stored = encode(&index(&[(a, 1), (b, 2)]));
        let mut known = KnownIndex::from_stored(Some(&stored));
        assert_eq!(known.lookup(0, a), Ok(Some(1)));
        assert_eq!(known.lookup(1, a), Err(SeenTwice), "by entity");
        assert_eq!(known.lookup(1, b), Ok(Some(2)));
        assert_eq!(known.lookup(1, b), Err(SeenTwice), "in place");
    }

    #[test]
    fn an_index_waits_for_its_groups_writes_and_decoding() {
        let mut gate = IndexGate::default();
        let pairs = index(&[(1, 2)]);
        gate.opened((0, 0));
        gate.opened((0, 0));
        assert_eq!(
            gate.decoded((0, 0), pairs.clone()),
            None,
            "writes in flight"
        );
        assert_eq!(gate.closed((0, 0)), None, "one write still in flight");
        assert_eq!(gate.closed((0, 0)), Some(((0, 0), pairs.clone())));
        assert!(gate.is_empty());
        // Writes done before the last batch was decoded.
        gate.opened((0, 1));
        assert_eq!(gate.closed((0, 1)), None, "not decoded yet");
        assert_eq!(gate.decoded((0, 1), pairs.clone()), Some(((0, 1), pairs)));
        // A group with nothing to write goes out as soon as it is decoded.
        let empty = index(&[]);
        assert_eq!(gate.decoded((1, 0), empty.clone()), Some(((1, 0), empty)));
    }
}
