//! The feature table: Parquet files at a URI (`file://`, `s3://`), listed in a stable order,
//! their footers read once so every shard sees the same row groups, and one row group
//! streamed at a time in `batchSize` record batches (only the id and input columns are
//! decoded), so memory stays flat however large the table is. A row group is read into
//! memory whole ([`Input::fetch`], in `memory`) or, when it is too large for that, streamed
//! to an anonymous local file and decoded from there a page at a time ([`Input::spool`], in
//! `spool`), so memory stays flat however large its row groups are too.

mod local;
mod memory;
mod object;
mod spool;

use std::ops::Range;
use std::sync::Arc;

use arrow_array::RecordBatch;
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderBuilder, ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
};
use parquet::arrow::async_reader::ParquetRecordBatchStream;
use parquet::errors::ParquetError;

pub use memory::{GroupBytes, Prefetched};
pub use object::ObjectFile;
use object::external;
pub use spool::Spooled;

use super::shard::Unit;
use super::sizing::column_decode_bytes;
use crate::fetch::{FetchError, store_for};

/// The input cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The URI is unusable.
    #[error(transparent)]
    Location(#[from] FetchError),
    /// Listing or reading the store failed.
    #[error("{uri}: {source}")]
    Store {
        /// What was being read.
        uri: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// No Parquet file at the URI.
    #[error("{uri}: no .parquet files there")]
    Empty {
        /// The URI.
        uri: String,
    },
    /// A file is not readable Parquet.
    #[error("{file}: not a readable Parquet file: {source}")]
    Corrupt {
        /// The file.
        file: String,
        /// Why.
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// A local file's status cannot be read.
    #[error("{file}: cannot read the file's status: {source}")]
    Status {
        /// The file.
        file: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file has no rows.
    #[error("{file}: the file has no rows")]
    NoRows {
        /// The file.
        file: String,
    },
    /// A column the model needs is absent.
    #[error("{file}: no column {column:?} (the file has {available:?})")]
    MissingColumn {
        /// The file.
        file: String,
        /// The column.
        column: String,
        /// The columns it has.
        available: Vec<String>,
    },
    /// A file changed while the run read it (its version is no longer the one listed).
    #[error(
        "{file}: changed while this run read it (it is no longer version {version}); rerun the batch once the input stops changing"
    )]
    Changed {
        /// The file.
        file: String,
        /// The version listed.
        version: String,
    },
    /// A row group too large for memory could not be spooled to local disk.
    #[error(
        "spooling a row group to {dir}: {source} (large row groups are read to local disk first: give the pod more ephemeral storage, or point --spool-dir elsewhere)"
    )]
    Spool {
        /// The spool directory.
        dir: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Decoding a row group failed.
    #[error("{file}: row group {row_group}: {source}")]
    Decode {
        /// The file.
        file: String,
        /// The row group.
        row_group: usize,
        /// Why.
        #[source]
        source: parquet::errors::ParquetError,
    },
}

/// One input file and its footer.
pub struct InputFile {
    /// The file's URI, for messages.
    pub uri: String,
    path: ObjectPath,
    size: u64,
    /// The store's version of the object when it was listed (its ETag), if it has one:
    /// every read is conditional on it.
    e_tag: Option<String>,
    /// A local file's change time when it was listed, checked again after every read.
    stamp: Option<local::Stamp>,
    /// The version the run records (the ETag, and a local file's change time).
    version: Option<String>,
    metadata: ArrowReaderMetadata,
}

/// The listed input.
pub struct Input {
    store: Arc<dyn ObjectStore>,
    /// Whether it is on an object store (anything but `file://`), where reads wait on
    /// requests rather than copy from the page cache.
    pub remote: bool,
    /// The files, sorted by path.
    pub files: Vec<InputFile>,
}

impl Input {
    /// Lists the `.parquet` files at `uri` (one file, or every file under a prefix or
    /// directory) and reads their footers.
    pub async fn open(uri: &str) -> Result<Self, InputError> {
        let (store, path) = store_for(uri)?;
        Self::open_in(store, path, uri).await
    }

    /// [`Input::open`] on a store already built: `path` in `store`, named `uri` in messages.
    pub async fn open_in(
        store: Arc<dyn ObjectStore>,
        path: ObjectPath,
        uri: &str,
    ) -> Result<Self, InputError> {
        let store_error = |source| InputError::Store {
            uri: uri.to_string(),
            source,
        };
        let mut objects: Vec<(ObjectPath, u64, Option<String>)> =
            if path.as_ref().ends_with(".parquet") {
                let meta = store.head(&path).await.map_err(store_error)?;
                vec![(meta.location, meta.size, meta.e_tag)]
            } else {
                let prefix = (!path.as_ref().is_empty()).then_some(&path);
                store
                    .list(prefix)
                    .try_filter(|meta| {
                        futures::future::ready(meta.location.as_ref().ends_with(".parquet"))
                    })
                    .map_ok(|meta| (meta.location, meta.size, meta.e_tag))
                    .try_collect()
                    .await
                    .map_err(store_error)?
            };
        objects.sort();
        if objects.is_empty() {
            return Err(InputError::Empty {
                uri: uri.to_string(),
            });
        }
        let base = uri_base(uri);
        // A local file's ETag can stay as listed through a rewrite in place: its change
        // time cannot (see `local`).
        let local = uri.starts_with("file:").then(LocalFileSystem::new);
        // Every shard reads every footer: concurrently, one request each, so a table of
        // thousands of files on an object store does not take minutes to open.
        let files = futures::stream::iter(objects.into_iter().map(|(path, size, e_tag)| {
            let store = Arc::clone(&store);
            let file_uri = format!("{base}{path}");
            let on_disk = local.as_ref().map(|fs| fs.path_to_filesystem(&path));
            async move {
                let stamp = match on_disk {
                    Some(on_disk) => {
                        let on_disk = on_disk.map_err(|source| InputError::Store {
                            uri: file_uri.clone(),
                            source,
                        })?;
                        local::Stamp::of(on_disk)
                            .await
                            .map_err(|source| InputError::Status {
                                file: file_uri.clone(),
                                source,
                            })?
                    }
                    None => None,
                };
                let version = match (&e_tag, &stamp) {
                    (Some(tag), Some(stamp)) => Some(stamp.version(tag)),
                    (tag, _) => tag.clone(),
                };
                let mut reader = ObjectFile::new(store, path.clone(), size);
                let metadata =
                    ArrowReaderMetadata::load_async(&mut reader, ArrowReaderOptions::new())
                        .await
                        .map_err(|source| InputError::Corrupt {
                            file: file_uri.clone(),
                            source,
                        })?;
                if metadata.metadata().file_metadata().num_rows() == 0 {
                    return Err(InputError::NoRows { file: file_uri });
                }
                Ok(InputFile {
                    uri: file_uri,
                    path,
                    size,
                    e_tag,
                    stamp,
                    version,
                    metadata,
                })
            }
        }))
        .buffered(FOOTER_READS)
        .try_collect()
        .await?;
        let remote = !uri.starts_with("file:");
        Ok(Self {
            store,
            remote,
            files,
        })
    }

    /// Rows per row group, per file: what the shard plan splits.
    pub fn row_groups(&self) -> Vec<Vec<u64>> {
        self.files
            .iter()
            .map(|f| {
                f.metadata
                    .metadata()
                    .row_groups()
                    .iter()
                    .map(|rg| rg.num_rows().max(0) as u64)
                    .collect()
            })
            .collect()
    }

    /// Checks that every file has `columns`.
    pub fn check_columns(&self, columns: &[&str]) -> Result<(), InputError> {
        for file in &self.files {
            let schema = file.metadata.schema();
            for column in columns {
                if schema.index_of(column).is_err() {
                    return Err(InputError::MissingColumn {
                        file: file.uri.clone(),
                        column: column.to_string(),
                        available: schema.fields().iter().map(|f| f.name().clone()).collect(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The version file `file` had when it was listed, if the store gives one: its ETag
    /// and, for a local file, its change time.
    pub fn version(&self, file: usize) -> Option<&str> {
        self.files.get(file).and_then(|f| f.version.as_deref())
    }

    /// Fails with [`InputError::Changed`] if local file `file` changed since it was listed
    /// (its change time moved): called after its bytes were read, so they belong to the
    /// version listed. Nothing to check on an object store, whose reads are conditional on
    /// the ETag.
    async fn confirm_unchanged(&self, file: &InputFile) -> Result<(), InputError> {
        let Some(stamp) = &file.stamp else {
            return Ok(());
        };
        let unchanged = stamp
            .unchanged()
            .await
            .map_err(|source| InputError::Status {
                file: file.uri.clone(),
                source,
            })?;
        match unchanged {
            true => Ok(()),
            false => Err(InputError::Changed {
                file: file.uri.clone(),
                version: file.version.clone().unwrap_or_default(),
            }),
        }
    }

    /// `columns` with the types file `file`'s schema gives them (`name:type;` each), for a
    /// row group's digest.
    pub fn column_types(&self, file: usize, columns: &[&str]) -> String {
        let schema = self.files[file].metadata.schema();
        columns
            .iter()
            .map(|name| match schema.field_with_name(name) {
                Ok(field) => format!("{name}:{:?};", field.data_type()),
                Err(_) => format!("{name}:absent;"),
            })
            .collect()
    }

    /// The projection of `columns` in `file`.
    fn projection(file: &InputFile, columns: &[&str]) -> ProjectionMask {
        let schema = file.metadata.schema();
        let indices: Vec<usize> = columns
            .iter()
            .filter_map(|c| schema.index_of(c).ok())
            .collect();
        ProjectionMask::roots(file.metadata.parquet_schema(), indices)
    }

    /// The bytes of `unit`'s column chunks for `columns` (compressed, as read): what decides
    /// whether the row group is held in memory or spooled, and how many fit in flight.
    pub fn chunk_bytes(&self, unit: &Unit, columns: &[&str]) -> Result<u64, InputError> {
        Ok(self
            .chunk_ranges(unit, columns)?
            .iter()
            .map(|range| range.end - range.start)
            .sum())
    }

    /// Where `unit`'s column chunks for `columns` lie in its file, in file order: what
    /// [`Input::fetch`] and [`Input::spool`] read, and what a row group's digest covers.
    pub fn chunk_ranges(
        &self,
        unit: &Unit,
        columns: &[&str],
    ) -> Result<Vec<Range<u64>>, InputError> {
        let file = &self.files[unit.file];
        let mask = Self::projection(file, columns);
        let group = file.metadata.metadata().row_group(unit.row_group);
        let mut ranges = Vec::new();
        for (leaf, column) in group.columns().iter().enumerate() {
            if !mask.leaf_included(leaf) {
                continue;
            }
            // Where the Parquet reader reads the chunk (its dictionary page first, if any).
            let start = column
                .dictionary_page_offset()
                .unwrap_or(column.data_page_offset());
            let end = start.checked_add(column.compressed_size());
            match (
                u64::try_from(start),
                end.and_then(|e| u64::try_from(e).ok()),
            ) {
                (Ok(start), Some(end)) if start <= end && end <= file.size => {
                    ranges.push(start..end)
                }
                _ => {
                    return Err(decode_error(
                        file,
                        unit,
                        ParquetError::General(format!(
                            "column {} lies outside the file ({} bytes at offset {start} of {})",
                            column.column_path(),
                            column.compressed_size(),
                            file.size
                        )),
                    ));
                }
            }
        }
        ranges.sort_by_key(|r| r.start);
        Ok(ranges)
    }

    /// What decoding `unit`'s row group (`columns` of it) is estimated to hold at once: each
    /// chunk's dictionary and one data page ([`column_decode_bytes`]), and the compressed
    /// chunks themselves when the group is `held` in memory rather than spooled. What a
    /// decoder reserves of the shard's decoding memory before it reads the group.
    pub fn decode_bytes(&self, unit: &Unit, columns: &[&str], held: bool) -> u64 {
        let file = &self.files[unit.file];
        let mask = Self::projection(file, columns);
        let group = file.metadata.metadata().row_group(unit.row_group);
        group
            .columns()
            .iter()
            .enumerate()
            .filter(|(leaf, _)| mask.leaf_included(*leaf))
            .map(|(_, column)| {
                let held_bytes = match held {
                    true => u64::try_from(column.compressed_size()).unwrap_or(0),
                    false => 0,
                };
                held_bytes
                    + column_decode_bytes(
                        column.dictionary_page_offset(),
                        column.data_page_offset(),
                        column.compressed_size(),
                        column.uncompressed_size(),
                    )
            })
            .sum()
    }

    /// `builder` set to decode `unit`'s row group of `file`, only `columns`, in record
    /// batches of `batch_size` rows.
    fn one_group<T>(
        builder: ArrowReaderBuilder<T>,
        file: &InputFile,
        unit: &Unit,
        columns: &[&str],
        batch_size: usize,
    ) -> ArrowReaderBuilder<T> {
        builder
            .with_row_groups(vec![unit.row_group])
            .with_projection(Self::projection(file, columns))
            .with_batch_size(batch_size)
    }

    /// `unit`'s row group in record batches of `batch_size` rows, decoding only `columns`,
    /// from where [`Input::fetch`] or [`Input::spool`] put its bytes.
    pub fn batches(
        &self,
        unit: &Unit,
        columns: &[&str],
        batch_size: usize,
        source: GroupSource,
    ) -> Result<RowGroupBatches, InputError> {
        Ok(match source {
            GroupSource::Memory(fetched) => {
                RowGroupBatches::Memory(self.stream(unit, columns, batch_size, fetched)?)
            }
            GroupSource::Spooled(spooled) => {
                RowGroupBatches::Spooled(self.read_spooled(unit, columns, batch_size, spooled)?)
            }
        })
    }
}

/// Where a row group's bytes are: in memory ([`Input::fetch`]) or in a spool file
/// ([`Input::spool`]).
pub enum GroupSource {
    /// Held in memory.
    Memory(GroupBytes),
    /// On local disk.
    Spooled(Spooled),
}

/// A row group's record batches, decoded from memory or, page by page, from a spool file.
pub enum RowGroupBatches {
    /// From bytes held in memory.
    Memory(ParquetRecordBatchStream<Prefetched>),
    /// From a spool file.
    Spooled(ParquetRecordBatchReader),
}

impl RowGroupBatches {
    /// The next record batch, if any.
    pub async fn next_batch(&mut self) -> Option<Result<RecordBatch, ParquetError>> {
        match self {
            Self::Memory(stream) => stream.next().await,
            Self::Spooled(reader) => reader
                .next()
                .map(|batch| batch.map_err(|e| ParquetError::ArrowError(e.to_string()))),
        }
    }
}

/// Footers read at once when a table is opened.
const FOOTER_READS: usize = 32;

/// Turns a store's error while reading `unit` into the shard's error: a failed version
/// condition means the file changed after it was listed.
fn read_error(file: &InputFile, unit: &Unit, error: object_store::Error) -> InputError {
    match (error, &file.version) {
        (object_store::Error::Precondition { .. }, Some(version)) => InputError::Changed {
            file: file.uri.clone(),
            version: version.clone(),
        },
        (error, _) => decode_error(file, unit, external(error)),
    }
}

/// `unit`'s row group of `file` cannot be read or decoded.
fn decode_error(file: &InputFile, unit: &Unit, source: ParquetError) -> InputError {
    InputError::Decode {
        file: file.uri.clone(),
        row_group: unit.row_group,
        source,
    }
}

/// Chunks this close together are read in one request (the gap read and dropped): one
/// round trip instead of two to an object store costs more than a megabyte of transfer.
const COALESCE_GAP: u64 = 1 << 20;

/// `ranges` (in file order) merged where they overlap or lie less than `gap` apart.
fn coalesce(ranges: &[Range<u64>], gap: u64) -> Vec<Range<u64>> {
    let mut sorted = ranges.to_vec();
    sorted.sort_by_key(|r| r.start);
    let mut spans: Vec<Range<u64>> = Vec::new();
    for range in sorted {
        match spans.last_mut() {
            Some(last) if range.start <= last.end.saturating_add(gap) => {
                last.end = last.end.max(range.end);
            }
            _ => spans.push(range),
        }
    }
    spans
}

/// `scheme://authority/` of a URI, to name listed files in messages.
fn uri_base(uri: &str) -> String {
    match url::Url::parse(uri) {
        Ok(url) if url.scheme() == "file" => "file:///".to_string(),
        Ok(url) => format!("{}://{}/", url.scheme(), url.authority()),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearby_ranges_are_read_together_and_far_ones_apart() {
        assert_eq!(coalesce(&[0..10, 10..20, 25..30], 5), vec![0..30]);
        assert_eq!(coalesce(&[0..10, 16..20], 5), vec![0..10, 16..20]);
        assert_eq!(coalesce(&[40..50, 0..10, 5..12], 0), vec![0..12, 40..50]);
        assert!(coalesce(&[], 5).is_empty());
    }

    /// A one-row-group table of an id and a feature column at `path`.
    fn write_table(path: &std::path::Path) {
        use arrow_array::{ArrayRef, Float32Array, StringArray};
        let batch = RecordBatch::try_from_iter([
            (
                "id",
                Arc::new(StringArray::from(vec!["a", "b", "c"])) as ArrayRef,
            ),
            (
                "x",
                Arc::new(Float32Array::from(vec![1.0, 2.0, 3.0])) as ArrayRef,
            ),
        ])
        .expect("batch");
        let file = std::fs::File::create(path).expect("create");
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
    }

    #[tokio::test]
    async fn a_local_file_touched_after_it_was_listed_fails_the_read_in_memory_and_spooled() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("t.parquet");
        write_table(&path);
        let input = Input::open(&format!("file://{}", path.display()))
            .await
            .expect("open");
        let version = input
            .version(0)
            .expect("a local file has a version")
            .to_string();
        let unit = Unit {
            file: 0,
            row_group: 0,
            rows: 3,
        };
        let columns = ["id", "x"];
        input.fetch(&unit, &columns).await.expect("unchanged: read");

        // Only the change time moves: same inode, size and modification time, so the same
        // ETag, which is all the store's conditional read looks at.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mtime = std::fs::metadata(&path)
            .expect("stat")
            .modified()
            .expect("mtime");
        std::fs::File::options()
            .write(true)
            .open(&path)
            .expect("open")
            .set_modified(mtime)
            .expect("touch");

        let changed = |result: Result<(), InputError>| match result {
            Err(InputError::Changed { file, version: v }) => {
                assert!(file.ends_with("t.parquet"), "{file}");
                assert_eq!(v, version);
            }
            other => panic!("expected Changed, got {other:?}"),
        };
        changed(input.fetch(&unit, &columns).await.map(|_| ()));
        let mut digest = crate::batch::digest::Digest::new(1);
        changed(
            input
                .spool(&unit, &columns, dir.path(), &mut digest)
                .await
                .map(|_| ()),
        );
        let reopened = Input::open(&format!("file://{}", path.display()))
            .await
            .expect("open");
        assert_ne!(reopened.version(0), Some(version.as_str()), "a new version");
    }
}
