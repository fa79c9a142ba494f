//! The feature table: Parquet files at a URI (`file://`, `s3://`), listed in a stable order,
//! their footers read once so every shard sees the same row groups, and one row group
//! streamed at a time in `batchSize` record batches (only the id and input columns are
//! decoded), so memory stays flat however large the table is. A row group is read into
//! memory whole ([`Input::fetch`]) or, when it is too large for that, streamed to an
//! anonymous local file and decoded from there a page at a time ([`Input::spool`]), so
//! memory stays flat however large its row groups are too.

use std::ops::Range;
use std::sync::Arc;

use arrow_array::RecordBatch;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, ObjectStore, ObjectStoreExt};
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderBuilder, ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStream};
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use parquet::file::reader::{ChunkReader, Length};
use tokio::io::AsyncWriteExt;

use super::digest::Digest;
use super::shard::Unit;
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
    /// The store's version of the object when it was listed (its ETag), if it has one.
    e_tag: Option<String>,
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
        // Every shard reads every footer: concurrently, one request each, so a table of
        // thousands of files on an object store does not take minutes to open.
        let files = futures::stream::iter(objects.into_iter().map(|(path, size, e_tag)| {
            let store = Arc::clone(&store);
            let file_uri = format!("{base}{path}");
            async move {
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

    /// The version (ETag) file `file` had when it was listed, if the store gives one.
    pub fn version(&self, file: usize) -> Option<&str> {
        self.files.get(file).and_then(|f| f.e_tag.as_deref())
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

    /// Reads the raw bytes of `unit`'s column chunks for `columns` (one request, which the
    /// store may coalesce): what [`Input::batches`] decodes, and what a row group's content
    /// digest covers.
    pub async fn fetch(&self, unit: &Unit, columns: &[&str]) -> Result<GroupBytes, InputError> {
        let file = &self.files[unit.file];
        let ranges = self.chunk_ranges(unit, columns)?;
        // Nearby chunks are read together, each span only if the object is still the
        // version listed: the bytes then belong to that version, which the index records.
        let spans = coalesce(&ranges, COALESCE_GAP);
        let reads = spans.iter().map(|span| {
            let options = GetOptions {
                range: Some(span.clone().into()),
                if_match: file.e_tag.clone(),
                ..GetOptions::default()
            };
            async move {
                let result = self.store.get_opts(&file.path, options).await?;
                result.bytes().await
            }
        });
        let read = futures::future::try_join_all(reads)
            .await
            .map_err(|error| read_error(file, unit, error))?;
        let bytes_read = read.iter().map(|b| b.len() as u64).sum();
        let spans = GroupBytes {
            ranges: spans,
            chunks: read,
            bytes_read,
        };
        let chunks = ranges
            .iter()
            .map(|range| {
                spans.slice(range).ok_or_else(|| {
                    decode_error(
                        file,
                        unit,
                        ParquetError::General(format!(
                            "the store returned fewer bytes than asked for at {range:?}"
                        )),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(GroupBytes {
            ranges,
            chunks,
            bytes_read,
        })
    }

    /// Streams `unit`'s row group in record batches of `batch_size` rows, decoding only
    /// `columns`, from `fetched` (its [`Input::fetch`]; anything else the reader asks for is
    /// read from the store).
    fn stream(
        &self,
        unit: &Unit,
        columns: &[&str],
        batch_size: usize,
        fetched: GroupBytes,
    ) -> Result<ParquetRecordBatchStream<Prefetched>, InputError> {
        let file = &self.files[unit.file];
        let reader = Prefetched {
            fetched,
            store: ObjectFile::new(Arc::clone(&self.store), file.path.clone(), file.size),
        };
        let builder =
            ParquetRecordBatchStreamBuilder::new_with_metadata(reader, file.metadata.clone());
        Self::one_group(builder, file, unit, columns, batch_size)
            .build()
            .map_err(|source| decode_error(file, unit, source))
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

    /// Streams `unit`'s column chunks for `columns` into an anonymous file in `dir`, in
    /// requests of at most 8 MiB (`SPOOL_PIECE`; each only if the object is still the version
    /// listed), feeding `digest` every chunk's bytes as they pass: a row group too large to
    /// hold in memory is read once and then decoded page by page from local disk
    /// ([`Input::batches`]).
    pub async fn spool(
        &self,
        unit: &Unit,
        columns: &[&str],
        dir: &std::path::Path,
        digest: &mut Digest,
    ) -> Result<Spooled, InputError> {
        let file = &self.files[unit.file];
        let spool_error = |source: std::io::Error| InputError::Spool {
            dir: dir.display().to_string(),
            source,
        };
        let ranges = self.chunk_ranges(unit, columns)?;
        let spans = coalesce(&ranges, COALESCE_GAP);
        // Written through tokio's file, whose writes run off the runtime's threads: a disk
        // under writeback pressure must not stall the decoders and Redis tasks beside it.
        let mut out = tokio::io::BufWriter::with_capacity(
            1 << 20,
            tokio::fs::File::from_std(tempfile::tempfile_in(dir).map_err(spool_error)?),
        );
        let mut chunks = ChunkFeed::new(&ranges);
        let mut placed = Vec::with_capacity(spans.len());
        let mut at = 0u64;
        for span in &spans {
            placed.push((span.clone(), at));
            let pieces: Vec<Range<u64>> = (span.start..span.end)
                .step_by(SPOOL_PIECE as usize)
                .map(|start| start..(start + SPOOL_PIECE).min(span.end))
                .collect();
            // Two requests in flight: the next piece arrives while this one is written.
            let mut reads = futures::stream::iter(pieces.into_iter().map(|piece| {
                let options = GetOptions {
                    range: Some(piece.clone().into()),
                    if_match: file.e_tag.clone(),
                    ..GetOptions::default()
                };
                async move {
                    let bytes = self
                        .store
                        .get_opts(&file.path, options)
                        .await?
                        .bytes()
                        .await?;
                    Ok::<_, object_store::Error>((piece, bytes))
                }
            }))
            .buffered(2);
            while let Some(read) = reads.next().await {
                let (piece, bytes) = read.map_err(|error| read_error(file, unit, error))?;
                if bytes.len() as u64 != piece.end - piece.start {
                    return Err(decode_error(
                        file,
                        unit,
                        ParquetError::General(format!(
                            "the store returned {} bytes for {piece:?}",
                            bytes.len()
                        )),
                    ));
                }
                chunks.feed(piece.start, &bytes, digest);
                out.write_all(&bytes).await.map_err(spool_error)?;
                at += bytes.len() as u64;
            }
        }
        chunks.finish(digest);
        out.flush().await.map_err(spool_error)?;
        let spooled = out.into_inner().into_std().await;
        Ok(Spooled {
            file: Arc::new(spooled),
            placed,
            size: file.size,
            bytes_read: at,
        })
    }

    /// Reads `unit`'s row group from its spool file in record batches of `batch_size` rows,
    /// one page per column in memory at a time.
    fn read_spooled(
        &self,
        unit: &Unit,
        columns: &[&str],
        batch_size: usize,
        spooled: Spooled,
    ) -> Result<ParquetRecordBatchReader, InputError> {
        let file = &self.files[unit.file];
        let builder =
            ParquetRecordBatchReaderBuilder::new_with_metadata(spooled, file.metadata.clone());
        Self::one_group(builder, file, unit, columns, batch_size)
            .build()
            .map_err(|source| decode_error(file, unit, source))
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

/// Bytes read from a file's end to get its footer in one request (most footers are a few
/// kilobytes; a larger one takes a second request).
const FOOTER_PREFETCH: usize = 64 << 10;

/// The largest request a spooled row group is read in: memory holds two of them at most.
const SPOOL_PIECE: u64 = 8 << 20;

/// Turns a store's error while reading `unit` into the shard's error: a failed version
/// condition means the file changed after it was listed.
fn read_error(file: &InputFile, unit: &Unit, error: object_store::Error) -> InputError {
    match (error, &file.e_tag) {
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

/// Hands a digest each chunk's bytes, in file order, as spans of the file stream past
/// (the gaps between chunks read with them are not part of any chunk).
struct ChunkFeed<'a> {
    chunks: &'a [Range<u64>],
    /// The chunk being fed.
    next: usize,
}

impl<'a> ChunkFeed<'a> {
    fn new(chunks: &'a [Range<u64>]) -> Self {
        Self { chunks, next: 0 }
    }

    /// Feeds `bytes`, which lie at `offset` in the file (pieces arrive in file order).
    fn feed(&mut self, offset: u64, bytes: &[u8], digest: &mut Digest) {
        let end = offset + bytes.len() as u64;
        while let Some(chunk) = self.chunks.get(self.next) {
            if chunk.start >= end {
                return;
            }
            let from = chunk.start.max(offset);
            let to = chunk.end.min(end);
            if from < to {
                digest.update(&bytes[(from - offset) as usize..(to - offset) as usize]);
            }
            if chunk.end > end {
                return;
            }
            digest.end_chunk();
            self.next += 1;
        }
    }

    /// Ends the chunks not ended yet: once every span has been fed, only empty ones.
    fn finish(mut self, digest: &mut Digest) {
        while self.next < self.chunks.len() {
            digest.end_chunk();
            self.next += 1;
        }
    }
}

/// A row group's column chunks in an anonymous local file (gone when the last handle is
/// dropped, even if the process dies), read by the Parquet reader at the offsets they have
/// in the original file.
pub struct Spooled {
    file: Arc<std::fs::File>,
    /// Each span of the original file read, and where it starts in the spool file.
    placed: Vec<(Range<u64>, u64)>,
    /// The original file's size.
    size: u64,
    /// Bytes read from the store.
    pub bytes_read: u64,
}

impl Spooled {
    /// Where `offset` of the original file lies in the spool file, and how many bytes of
    /// its span follow it.
    fn locate(&self, offset: u64) -> parquet::errors::Result<(u64, u64)> {
        self.placed
            .iter()
            .find(|(span, _)| span.start <= offset && offset < span.end)
            .map(|(span, at)| (at + (offset - span.start), span.end - offset))
            .ok_or_else(|| {
                ParquetError::General(format!(
                    "offset {offset} was not spooled with its row group"
                ))
            })
    }
}

impl Length for Spooled {
    fn len(&self) -> u64 {
        self.size
    }
}

impl ChunkReader for Spooled {
    type T = std::io::Take<std::io::BufReader<std::fs::File>>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        let (at, left) = self.locate(start)?;
        let mut file = self.file.try_clone()?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(at))?;
        Ok(std::io::Read::take(std::io::BufReader::new(file), left))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let (at, left) = self.locate(start)?;
        if length as u64 > left {
            return Err(ParquetError::General(format!(
                "{length} bytes at offset {start} run past what was spooled"
            )));
        }
        let mut buffer = vec![0; length];
        std::os::unix::fs::FileExt::read_exact_at(self.file.as_ref(), &mut buffer, at)?;
        Ok(Bytes::from(buffer))
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

/// The raw column chunks of one row group, as read from the store.
#[derive(Debug, Clone, Default)]
pub struct GroupBytes {
    /// Where each chunk lies in the file.
    pub ranges: Vec<Range<u64>>,
    /// The chunks, in the file's column order.
    pub chunks: Vec<Bytes>,
    /// Bytes read from the store for them (gaps between nearby chunks included).
    pub bytes_read: u64,
}

impl GroupBytes {
    /// The bytes of `range` if one chunk holds them all.
    fn slice(&self, range: &Range<u64>) -> Option<Bytes> {
        self.ranges
            .iter()
            .zip(&self.chunks)
            .find(|(held, _)| held.start <= range.start && range.end <= held.end)
            .and_then(|(held, chunk)| {
                let from = usize::try_from(range.start - held.start).ok()?;
                let to = usize::try_from(range.end - held.start).ok()?;
                (to <= chunk.len()).then(|| chunk.slice(from..to))
            })
    }
}

/// A row group's chunks already read, served to the Parquet reader without reading them
/// again; anything else it asks for comes from the store.
pub struct Prefetched {
    fetched: GroupBytes,
    store: ObjectFile,
}

impl AsyncFileReader for Prefetched {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        match self.fetched.slice(&range) {
            Some(bytes) => futures::future::ready(Ok(bytes)).boxed(),
            None => self.store.get_bytes(range),
        }
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        let held: Option<Vec<Bytes>> = ranges.iter().map(|r| self.fetched.slice(r)).collect();
        match held {
            Some(bytes) => futures::future::ready(Ok(bytes)).boxed(),
            None => self.store.get_byte_ranges(ranges),
        }
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        self.store.get_metadata(options)
    }
}

/// One object read by byte ranges: what the Parquet reader needs from a store.
pub struct ObjectFile {
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    size: u64,
}

impl ObjectFile {
    fn new(store: Arc<dyn ObjectStore>, path: ObjectPath, size: u64) -> Self {
        Self { store, path, size }
    }
}

fn external(e: object_store::Error) -> ParquetError {
    ParquetError::External(Box::new(e))
}

impl AsyncFileReader for ObjectFile {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            self.store
                .get_range(&self.path, range)
                .await
                .map_err(external)
        }
        .boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        // One call for every range lets the store coalesce nearby ones.
        async move {
            self.store
                .get_ranges(&self.path, &ranges)
                .await
                .map_err(external)
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        let size = self.size;
        async move {
            ParquetMetaDataReader::new()
                .with_prefetch_hint(Some(FOOTER_PREFETCH))
                .with_arrow_reader_options(options)
                .load_and_finish(self, size)
                .await
                .map(Arc::new)
        }
        .boxed()
    }
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
    fn streamed_pieces_digest_the_chunks_and_not_the_gaps_between_them() {
        let file: Vec<u8> = (0..40u8).collect();
        let chunks = [0..10, 20..25, 25..33, 33..33];
        let whole: Vec<Bytes> = chunks
            .iter()
            .map(|c| Bytes::copy_from_slice(&file[c.start as usize..c.end as usize]))
            .collect();
        let expected = super::super::digest::of_chunks(5, &whole);
        for cuts in [
            vec![0, 33],
            vec![0, 7, 22, 33],
            vec![0, 10, 20, 25, 26, 33],
            vec![0, 1, 2, 3, 33],
        ] {
            let mut digest = Digest::new(5);
            let mut feed = ChunkFeed::new(&chunks);
            for piece in cuts.windows(2) {
                feed.feed(
                    piece[0],
                    &file[piece[0] as usize..piece[1] as usize],
                    &mut digest,
                );
            }
            feed.finish(&mut digest);
            assert_eq!(digest.finish(), expected, "pieces cut at {cuts:?}");
        }
    }

    #[test]
    fn nearby_ranges_are_read_together_and_far_ones_apart() {
        assert_eq!(coalesce(&[0..10, 10..20, 25..30], 5), vec![0..30]);
        assert_eq!(coalesce(&[0..10, 16..20], 5), vec![0..10, 16..20]);
        assert_eq!(coalesce(&[40..50, 0..10, 5..12], 0), vec![0..12, 40..50]);
        assert!(coalesce(&[], 5).is_empty());
    }
}
