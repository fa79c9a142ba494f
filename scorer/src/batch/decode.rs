//! The decoding stage of a batch shard: Parquet row groups decoded, converted to rows, keyed
//! and fingerprinted by several tasks at once (`--decoders`, default 2), so on a machine with
//! more than one core decoding no longer waits on itself. Batches reach the scoring stage
//! through a bounded channel (memory stays flat: at most a few batches wait), each row
//! group's end is announced so its fingerprint index can be written, and the first error
//! stops the shard.

use std::sync::Arc;

use futures::TryStreamExt;
use millrace_crds::keys::{Keyspace, features_fingerprint};
use millrace_crds::spec::MissingFeatures;
use tokio::sync::mpsc;

use super::BatchError;
use super::convert::{Converted, Location, convert};
use super::index;
use super::input::{Input, InputError};
use super::shard::Unit;

/// One converted record batch, ready to score.
pub struct DecodedBatch {
    /// Ids and row-major features.
    pub converted: Converted,
    /// The Redis key of each id.
    pub keys: Vec<String>,
    /// The fingerprint of each row's features.
    pub fingerprints: Vec<u64>,
    /// The index hash of each id.
    pub id_hashes: Vec<u64>,
    /// The file's URI, for messages.
    pub file: String,
    /// The file's position in the listing.
    pub file_ordinal: usize,
    /// The row group.
    pub row_group: usize,
    /// Rows read (scored or skipped).
    pub rows: u64,
}

/// What the decoders send.
pub enum Decoded {
    /// A batch to score.
    Batch(DecodedBatch),
    /// Every batch of row group (file position, row group) has been sent.
    GroupDone(usize, usize),
}

/// What every decoder needs.
#[derive(Clone)]
pub struct DecodePlan {
    /// The input.
    pub input: Arc<Input>,
    /// The id column, then the model's inputs.
    pub columns: Vec<String>,
    /// The id column.
    pub id_column: String,
    /// The model's inputs, in order.
    pub inputs: Vec<String>,
    /// The null policy.
    pub missing: MissingFeatures,
    /// Rows per record batch.
    pub batch_size: usize,
    /// Where predictions go.
    pub keyspace: Keyspace,
    /// The generation written.
    pub generation: String,
    /// Inputs per row.
    pub features_per_row: usize,
}

/// Decodes `units` with at most `decoders` at once; returns the receiving end. The channel
/// closes when every unit is done or after the first error (sent as the last message).
pub fn start(
    plan: DecodePlan,
    units: Vec<Unit>,
    decoders: usize,
) -> mpsc::Receiver<Result<Decoded, BatchError>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let next = Arc::new(std::sync::Mutex::new(units.into_iter()));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..decoders.max(1) {
            let (plan, next, tx) = (plan.clone(), Arc::clone(&next), tx.clone());
            workers.spawn(async move {
                loop {
                    let unit = next.lock().ok().and_then(|mut units| units.next());
                    let Some(unit) = unit else { return };
                    if let Err(error) = decode_unit(&plan, &unit, &tx).await {
                        let _ = tx.send(Err(error)).await;
                        return;
                    }
                }
            });
        }
        while workers.join_next().await.is_some() {}
    });
    rx
}

async fn decode_unit(
    plan: &DecodePlan,
    unit: &Unit,
    tx: &mpsc::Sender<Result<Decoded, BatchError>>,
) -> Result<(), BatchError> {
    let file = plan
        .input
        .files
        .get(unit.file)
        .map(|f| f.uri.clone())
        .unwrap_or_default();
    let columns: Vec<&str> = plan.columns.iter().map(String::as_str).collect();
    let mut stream = plan.input.stream(unit, &columns, plan.batch_size)?;
    let mut first_row = 0;
    while let Some(record_batch) = stream
        .try_next()
        .await
        .map_err(|source| InputError::Decode {
            file: file.clone(),
            row_group: unit.row_group,
            source,
        })?
    {
        let at = Location {
            file: file.clone(),
            row_group: unit.row_group,
            first_row,
        };
        first_row += record_batch.num_rows();
        let converted = convert(
            &record_batch,
            &plan.id_column,
            &plan.inputs,
            &plan.missing,
            &at,
        )?;
        let keys = converted
            .ids
            .iter()
            .map(|id| plan.keyspace.batch(&plan.generation, id))
            .collect();
        let fingerprints = converted
            .rows
            .chunks(plan.features_per_row.max(1))
            .map(features_fingerprint)
            .collect();
        let id_hashes = converted.ids.iter().map(|id| index::id_hash(id)).collect();
        let batch = DecodedBatch {
            converted,
            keys,
            fingerprints,
            id_hashes,
            file: file.clone(),
            file_ordinal: unit.file,
            row_group: unit.row_group,
            rows: record_batch.num_rows() as u64,
        };
        if tx.send(Ok(Decoded::Batch(batch))).await.is_err() {
            return Ok(()); // the shard stopped
        }
    }
    let _ = tx
        .send(Ok(Decoded::GroupDone(unit.file, unit.row_group)))
        .await;
    Ok(())
}
