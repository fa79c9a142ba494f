//! Row groups read into memory whole: their column chunks fetched in as few requests as
//! the store allows (each only if the object is still the version listed), then served to
//! the Parquet reader from memory.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use object_store::{GetOptions, GetResultPayload};
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStream};
use parquet::errors::ParquetError;
use parquet::file::metadata::ParquetMetaData;

use super::object::ObjectFile;
use super::{COALESCE_GAP, Input, InputError, coalesce, decode_error, read_error};
use crate::batch::shard::Unit;

impl Input {
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
                match result.payload {
                    GetResultPayload::File(local, path) => {
                        let range = result.range;
                        tokio::task::spawn_blocking(move || read_local(local, &path, range))
                            .await
                            .map_err(|e| object_store::Error::Generic {
                                store: "LocalFileSystem",
                                source: Box::new(e),
                            })?
                    }
                    GetResultPayload::Stream(_) => result.bytes().await,
                }
            }
        });
        let read = futures::future::try_join_all(reads)
            .await
            .map_err(|error| read_error(file, unit, error))?;
        self.confirm_unchanged(file).await?;
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
    pub(super) fn stream(
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
}

/// Reads `range` of a local file into a buffer that is not zeroed first: `read_to_end`
/// fills the buffer's spare capacity directly, where the store's own read zeroes every byte
/// before reading over it (about 4% of an incremental run's CPU at 1M rows x 32 features,
/// all of it spent on bytes about to be overwritten).
fn read_local(
    mut file: std::fs::File,
    path: &std::path::Path,
    range: Range<u64>,
) -> Result<Bytes, object_store::Error> {
    use std::io::{Read, Seek, SeekFrom};
    let failed = |source: std::io::Error| object_store::Error::Generic {
        store: "LocalFileSystem",
        source: format!("reading bytes {range:?} of {}: {source}", path.display()).into(),
    };
    let wanted = range.end.saturating_sub(range.start);
    file.seek(SeekFrom::Start(range.start)).map_err(failed)?;
    let mut buffer = Vec::with_capacity(usize::try_from(wanted).unwrap_or(0));
    file.take(wanted).read_to_end(&mut buffer).map_err(failed)?;
    if buffer.len() as u64 != wanted {
        return Err(failed(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the file ended after {} of them", buffer.len()),
        )));
    }
    Ok(Bytes::from(buffer))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_local_range_is_read_exactly_or_named_when_the_file_is_shorter() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        let content: Vec<u8> = (0..=255).collect();
        file.write_all(&content).expect("write");
        let open = || std::fs::File::open(file.path()).expect("open");
        let read = read_local(open(), file.path(), 10..200).expect("read");
        assert_eq!(read.as_ref(), &content[10..200]);
        assert!(
            read_local(open(), file.path(), 7..7)
                .expect("empty")
                .is_empty()
        );
        let err = read_local(open(), file.path(), 250..300).expect_err("past the end");
        let message = err.to_string();
        assert!(message.contains("250..300"), "{message}");
        assert!(message.contains("ended after 6"), "{message}");
        assert!(
            message.contains(&file.path().display().to_string()),
            "{message}"
        );
    }
}
