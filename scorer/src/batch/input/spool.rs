//! Row groups too large for memory: their column chunks streamed to an anonymous local
//! file in bounded requests (hashed on the way for the content digest), then decoded from
//! there a page per column at a time.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::GetOptions;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::errors::ParquetError;
use parquet::file::reader::{ChunkReader, Length};
use tokio::io::AsyncWriteExt;

use super::{COALESCE_GAP, Input, InputError, coalesce, decode_error, read_error};
use crate::batch::digest::Digest;
use crate::batch::shard::Unit;

impl Input {
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
        self.confirm_unchanged(file).await?;
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
    pub(super) fn read_spooled(
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
}

/// The largest request a spooled row group is read in: memory holds two of them at most.
const SPOOL_PIECE: u64 = 8 << 20;

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
        let expected = crate::batch::digest::of_chunks(5, &whole);
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
}
