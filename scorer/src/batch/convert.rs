//! Turns one Arrow record batch of the feature table into entity ids and model rows, with
//! every way the data can be wrong named: file, column, row group and row.
//!
//! [`scan`] reads every row column by column (ids checked and hashed, features
//! fingerprinted); [`Scanned::gather`] then builds row-major features for the rows to score
//! only, so an incremental run pays for the changed rows alone.
//!
//! - The id column may be a string or an integer column (integers become their decimal
//!   text); each id must be a valid entity id. A null id is an error.
//! - Feature columns may be any integer or float type (read as f32). A null or non-finite
//!   feature follows `features.missing.policy`: `fill` scores the row with `fillValue` and
//!   counts it; `fallback` skips the row (no batch prediction: the online path computes it
//!   in real time on request; an incremental run withdraws the one an earlier run stored)
//!   and counts it. A non-numeric feature column is an error.

use arrow_array::cast::AsArray;
use arrow_array::types::Float32Type;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use millrace_crds::keys::{
    FINGERPRINT_SEED, fingerprint_column, fingerprint_finish, validate_entity_id,
};
use millrace_crds::spec::{MissingFeaturePolicy, MissingFeatures};

/// Where in the input a batch came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file.
    pub file: String,
    /// The row group.
    pub row_group: usize,
    /// The batch's first row's index within the row group.
    pub first_row: usize,
}

/// Bad data in the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// A column has a type the scorer cannot read.
    #[error("{file}: column {column:?} has type {found}; expected {expected}")]
    Type {
        /// The file.
        file: String,
        /// The column.
        column: String,
        /// Its type.
        found: String,
        /// What would do.
        expected: &'static str,
    },
    /// A value is unusable.
    #[error("{file}: column {column:?}, row group {row_group}, row {row}: {reason}")]
    Value {
        /// The file.
        file: String,
        /// The column.
        column: String,
        /// The row group.
        row_group: usize,
        /// The row within the row group.
        row: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Ids and rows ready for the model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Converted {
    /// Entity ids, one per scored row.
    pub ids: Vec<String>,
    /// Row-major features, `inputs.len()` per id.
    pub rows: Vec<f32>,
    /// Rows with a filled feature (fill policy).
    pub filled: u64,
    /// Rows skipped for a missing feature (fallback policy).
    pub skipped: u64,
}

/// A record batch read column by column: every id checked and hashed, every row's
/// fingerprint, and which rows miss a feature; features row by row are only built
/// ([`Scanned::gather`]) for the rows that will be scored, which in an incremental run is
/// the few that changed.
#[derive(Debug)]
pub struct Scanned {
    ids: arrow_array::ArrayRef,
    features: Vec<arrow_array::ArrayRef>,
    /// Per row: the index hash of its id ([`super::index::id_hash`]).
    pub id_hashes: Vec<u64>,
    /// Per row: the fingerprint of its features as scored (missing ones filled).
    pub fingerprints: Vec<u64>,
    /// Per row: whether a feature is missing (null or not finite); empty when none is.
    missing: Vec<bool>,
    policy: MissingFeaturePolicy,
    fill_value: f32,
    /// Rows with a filled feature (fill policy).
    pub filled: u64,
    /// Rows skipped for a missing feature (fallback policy).
    pub skipped: u64,
}

impl Scanned {
    /// Rows in the batch, scored or skipped.
    pub fn len(&self) -> usize {
        self.id_hashes.len()
    }

    /// Whether the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.id_hashes.is_empty()
    }

    /// Whether row `i` is scored (not skipped by the fallback policy).
    pub fn is_scored(&self, i: usize) -> bool {
        !(self.policy == MissingFeaturePolicy::Fallback && self.missing.get(i) == Some(&true))
    }

    /// The id of row `i`.
    pub fn id(&self, i: usize) -> &str {
        self.ids.as_string::<i32>().value(i)
    }

    /// The row-major features of `rows`, as the model takes them.
    pub fn gather(&self, rows: &[usize]) -> Vec<f32> {
        let columns: Vec<&arrow_array::PrimitiveArray<Float32Type>> = self
            .features
            .iter()
            .map(|c| c.as_primitive::<Float32Type>())
            .collect();
        let values: Vec<&[f32]> = columns.iter().map(|c| c.values().as_ref()).collect();
        let mut features = Vec::with_capacity(rows.len() * values.len());
        for &i in rows {
            if self.missing.get(i) == Some(&true) {
                features.extend(columns.iter().map(|c| {
                    Some(c.value(i))
                        .filter(|v| c.is_valid(i) && v.is_finite())
                        .unwrap_or(self.fill_value)
                }));
            } else {
                features.extend(values.iter().map(|v| v[i]));
            }
        }
        features
    }
}

/// Whether every value is finite. Checked in blocks without an early exit inside a block, so
/// the compiler can vectorise it: a per-value early exit made this a scalar loop, a sixth of
/// an incremental run's scan.
fn all_finite(values: &[f32]) -> bool {
    values
        .chunks(1024)
        .all(|block| block.iter().fold(true, |finite, v| finite & v.is_finite()))
}

/// Reads `batch`, which holds the id column and every input (found by name): checks every
/// id, hashes it, fingerprints every row's features column by column, and counts the rows
/// that miss a feature by the policy.
pub fn scan(
    batch: &RecordBatch,
    id_column: &str,
    inputs: &[String],
    missing: &MissingFeatures,
    at: &Location,
) -> Result<Scanned, ConvertError> {
    let n = batch.num_rows();
    let value_error = |column: &str, row: usize, reason: String| ConvertError::Value {
        file: at.file.clone(),
        column: column.to_string(),
        row_group: at.row_group,
        row: at.first_row + row,
        reason,
    };
    let column = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| ConvertError::Type {
                file: at.file.clone(),
                column: name.to_string(),
                found: "nothing (no such column)".into(),
                expected: "a column of that name",
            })
    };
    let ids = column(id_column)?;
    let ids = match ids.data_type() {
        DataType::Utf8 => ids.clone(),
        DataType::LargeUtf8 | DataType::Utf8View => arrow_cast::cast(ids, &DataType::Utf8)
            .map_err(|e| value_error(id_column, 0, e.to_string()))?,
        t if t.is_integer() => arrow_cast::cast(ids, &DataType::Utf8).map_err(|e| {
            value_error(
                id_column,
                0,
                format!("cannot read integer ids as text: {e}"),
            )
        })?,
        other => {
            return Err(ConvertError::Type {
                file: at.file.clone(),
                column: id_column.to_string(),
                found: other.to_string(),
                expected: "a string or integer column",
            });
        }
    };
    let mut id_hashes = Vec::with_capacity(n);
    {
        let text = ids.as_string::<i32>();
        for i in 0..n {
            if text.is_null(i) {
                return Err(value_error(id_column, i, "the entity id is null".into()));
            }
            let id = text.value(i);
            validate_entity_id(id)
                .map_err(|e| value_error(id_column, i, format!("{e} ({id:?})")))?;
            id_hashes.push(super::index::id_hash(id));
        }
    }

    let mut features = Vec::with_capacity(inputs.len());
    let mut hashes = vec![FINGERPRINT_SEED; n];
    let mut missing_rows: Vec<bool> = Vec::new();
    let mut folded = Vec::new();
    for name in inputs {
        let column = column(name)?;
        let numeric = column.data_type().is_numeric()
            && !matches!(
                column.data_type(),
                DataType::Decimal32(..)
                    | DataType::Decimal64(..)
                    | DataType::Decimal128(..)
                    | DataType::Decimal256(..)
            );
        if !numeric {
            return Err(ConvertError::Type {
                file: at.file.clone(),
                column: name.clone(),
                found: column.data_type().to_string(),
                expected: "an integer or float column",
            });
        }
        let as_f32 = arrow_cast::cast(column, &DataType::Float32)
            .map_err(|e| value_error(name, 0, e.to_string()))?;
        let typed = as_f32.as_primitive::<Float32Type>();
        let values: &[f32] = typed.values();
        if typed.null_count() == 0 && all_finite(values) {
            fingerprint_column(&mut hashes, values);
        } else {
            // A missing value is fingerprinted as what is scored in its place.
            missing_rows.resize(n, false);
            folded.clear();
            folded.extend((0..n).map(|i| {
                let present = typed.is_valid(i) && values[i].is_finite();
                missing_rows[i] |= !present;
                if present {
                    values[i]
                } else {
                    missing.fill_value
                }
            }));
            fingerprint_column(&mut hashes, &folded);
        }
        features.push(as_f32);
    }
    let fingerprints = hashes.into_iter().map(fingerprint_finish).collect();
    let with_missing = missing_rows.iter().filter(|&&m| m).count() as u64;
    let (filled, skipped) = match missing.policy {
        MissingFeaturePolicy::Fill => (with_missing, 0),
        MissingFeaturePolicy::Fallback => (0, with_missing),
    };
    Ok(Scanned {
        ids,
        features,
        id_hashes,
        fingerprints,
        missing: missing_rows,
        policy: missing.policy,
        fill_value: missing.fill_value,
        filled,
        skipped,
    })
}

/// Converts every scored row of `batch` ([`scan`], then [`Scanned::gather`] of them all).
pub fn convert(
    batch: &RecordBatch,
    id_column: &str,
    inputs: &[String],
    missing: &MissingFeatures,
    at: &Location,
) -> Result<Converted, ConvertError> {
    let scanned = scan(batch, id_column, inputs, missing, at)?;
    let rows: Vec<usize> = (0..scanned.len())
        .filter(|&i| scanned.is_scored(i))
        .collect();
    Ok(Converted {
        ids: rows.iter().map(|&i| scanned.id(i).to_string()).collect(),
        rows: scanned.gather(&rows),
        filled: scanned.filled,
        skipped: scanned.skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{ArrayRef, Float64Array, Int64Array, StringArray};
    use std::sync::Arc;

    fn at() -> Location {
        Location {
            file: "s3://lake/part-0.parquet".into(),
            row_group: 2,
            first_row: 100,
        }
    }

    fn inputs() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    fn batch(ids: ArrayRef, a: ArrayRef, b: ArrayRef) -> RecordBatch {
        RecordBatch::try_from_iter([("entity_id", ids), ("a", a), ("b", b)]).expect("batch")
    }

    fn fill() -> MissingFeatures {
        MissingFeatures {
            policy: MissingFeaturePolicy::Fill,
            fill_value: -1.0,
        }
    }

    #[test]
    fn a_value_that_is_not_finite_is_found_in_any_block() {
        let mut values = vec![1.5_f32; 3000];
        assert!(all_finite(&values));
        assert!(all_finite(&[]));
        for (at, bad) in [
            (0, f32::NAN),
            (1023, f32::INFINITY),
            (1024, f32::NEG_INFINITY),
            (2999, f32::NAN),
        ] {
            values[at] = bad;
            assert!(!all_finite(&values), "{bad} at {at}");
            values[at] = 1.5;
        }
    }

    #[test]
    fn rows_are_row_major_in_model_order_and_types_are_widened() {
        let b = batch(
            Arc::new(Int64Array::from(vec![7, 8])),
            Arc::new(Float64Array::from(vec![1.5, 2.5])),
            Arc::new(Int64Array::from(vec![3, 4])),
        );
        let got = convert(&b, "entity_id", &inputs(), &fill(), &at()).expect("convert");
        assert_eq!(got.ids, vec!["7", "8"]);
        assert_eq!(got.rows, vec![1.5, 3.0, 2.5, 4.0]);
        assert_eq!((got.filled, got.skipped), (0, 0));
    }

    #[test]
    fn missing_features_follow_the_policy() {
        let b = batch(
            Arc::new(StringArray::from(vec!["u1", "u2", "u3"])),
            Arc::new(Float64Array::from(vec![Some(1.0), None, Some(f64::NAN)])),
            Arc::new(Float64Array::from(vec![2.0, 2.0, 2.0])),
        );
        let got = convert(&b, "entity_id", &inputs(), &fill(), &at()).expect("fill");
        assert_eq!(got.rows, vec![1.0, 2.0, -1.0, 2.0, -1.0, 2.0]);
        assert_eq!(got.filled, 2);
        let skip = MissingFeatures {
            policy: MissingFeaturePolicy::Fallback,
            fill_value: 0.0,
        };
        let got = convert(&b, "entity_id", &inputs(), &skip, &at()).expect("skip");
        assert_eq!(got.ids, vec!["u1"]);
        assert_eq!(got.skipped, 2);
    }

    #[test]
    fn scanned_fingerprints_are_those_of_the_rows_as_scored() {
        let b = batch(
            Arc::new(StringArray::from(vec!["u1", "u2", "u3"])),
            Arc::new(Float64Array::from(vec![
                Some(1.0),
                None,
                Some(f64::INFINITY),
            ])),
            Arc::new(Float64Array::from(vec![2.0, 3.0, 4.0])),
        );
        let scanned = scan(&b, "entity_id", &inputs(), &fill(), &at()).expect("scan");
        let rows = scanned.gather(&[2, 0, 1]);
        assert_eq!([2, 0, 1].map(|i| scanned.id(i)), ["u3", "u1", "u2"]);
        assert_eq!(rows, vec![-1.0, 4.0, 1.0, 2.0, -1.0, 3.0]);
        for (k, &i) in [2, 0, 1].iter().enumerate() {
            assert_eq!(
                scanned.fingerprints[i],
                millrace_crds::keys::features_fingerprint(&rows[k * 2..k * 2 + 2]),
                "row {i}"
            );
            assert_eq!(
                scanned.id_hashes[i],
                crate::batch::index::id_hash(scanned.id(i))
            );
        }
        assert!((0..3).all(|i| scanned.is_scored(i)));
        let skip = MissingFeatures {
            policy: MissingFeaturePolicy::Fallback,
            fill_value: 0.0,
        };
        let scanned = scan(&b, "entity_id", &inputs(), &skip, &at()).expect("scan");
        assert_eq!(
            (0..3).map(|i| scanned.is_scored(i)).collect::<Vec<_>>(),
            vec![true, false, false]
        );
    }

    #[test]
    fn bad_values_name_file_column_row_group_and_row() {
        let b = batch(
            Arc::new(StringArray::from(vec![Some("u1"), None])),
            Arc::new(Float64Array::from(vec![1.0, 1.0])),
            Arc::new(Float64Array::from(vec![1.0, 1.0])),
        );
        let err = convert(&b, "entity_id", &inputs(), &fill(), &at()).expect_err("null id");
        assert_eq!(
            err.to_string(),
            "s3://lake/part-0.parquet: column \"entity_id\", row group 2, row 101: the entity id is null"
        );
        let b = batch(
            Arc::new(StringArray::from(vec!["bad{id}"])),
            Arc::new(Float64Array::from(vec![1.0])),
            Arc::new(Float64Array::from(vec![1.0])),
        );
        let err = convert(&b, "entity_id", &inputs(), &fill(), &at()).expect_err("braces");
        assert!(err.to_string().contains("row 100"), "{err}");
        assert!(err.to_string().contains("'{'"), "{err}");
    }

    #[test]
    fn non_numeric_features_are_refused_by_name() {
        let b = batch(
            Arc::new(StringArray::from(vec!["u1"])),
            Arc::new(Float64Array::from(vec![1.0])),
            Arc::new(StringArray::from(vec!["high"])),
        );
        let err = convert(&b, "entity_id", &inputs(), &fill(), &at()).expect_err("type");
        assert_eq!(
            err.to_string(),
            "s3://lake/part-0.parquet: column \"b\" has type Utf8; expected an integer or float column"
        );
    }
}
