//! Turns one Arrow record batch of the feature table into entity ids and model rows, with
//! every way the data can be wrong named: file, column, row group and row.
//!
//! - The id column may be a string or an integer column (integers become their decimal
//!   text); each id must be a valid entity id. A null id is an error.
//! - Feature columns may be any integer or float type (read as f32). A null or non-finite
//!   feature follows `features.missing.policy`: `fill` scores the row with `fillValue` and
//!   counts it; `fallback` skips the row (no batch prediction: the online path computes it
//!   in real time on request) and counts it. A non-numeric feature column is an error.

use arrow_array::cast::AsArray;
use arrow_array::types::Float32Type;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use millrace_crds::keys::validate_entity_id;
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

/// Converts `batch`, which holds the id column and every input (found by name).
pub fn convert(
    batch: &RecordBatch,
    id_column: &str,
    inputs: &[String],
    missing: &MissingFeatures,
    at: &Location,
) -> Result<Converted, ConvertError> {
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
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => ids.clone(),
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
    let ids = arrow_cast::cast(&ids, &DataType::Utf8)
        .map_err(|e| value_error(id_column, 0, e.to_string()))?;
    let ids = ids.as_string::<i32>();

    let mut columns = Vec::with_capacity(inputs.len());
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
        columns.push(as_f32);
    }
    let columns: Vec<&arrow_array::PrimitiveArray<Float32Type>> = columns
        .iter()
        .map(|c| c.as_primitive::<Float32Type>())
        .collect();

    let features = inputs.len();
    let mut out = Converted {
        ids: Vec::with_capacity(n),
        rows: Vec::with_capacity(n * features),
        ..Converted::default()
    };
    let mut row = Vec::with_capacity(features);
    for i in 0..n {
        if ids.is_null(i) {
            return Err(value_error(id_column, i, "the entity id is null".into()));
        }
        let id = ids.value(i);
        validate_entity_id(id).map_err(|e| value_error(id_column, i, format!("{e} ({id:?})")))?;
        row.clear();
        let mut any_missing = false;
        for column in &columns {
            let value = (!column.is_null(i))
                .then(|| column.value(i))
                .filter(|v| v.is_finite());
            any_missing |= value.is_none();
            row.push(value.unwrap_or(missing.fill_value));
        }
        if any_missing {
            match missing.policy {
                MissingFeaturePolicy::Fill => out.filled += 1,
                MissingFeaturePolicy::Fallback => {
                    out.skipped += 1;
                    continue;
                }
            }
        }
        out.ids.push(id.to_string());
        out.rows.extend_from_slice(&row);
    }
    Ok(out)
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
