//! The shared model module on a real `.onnx` file with the real ONNX Runtime library:
//! predictions equal what ONNX Runtime's Python API gives, row for row; batched runs equal
//! single-row runs; a model that does not match the spec is refused with a reason.
//!
//! Needs ORT_DYLIB_PATH (`eval "$(scripts/env.sh)"`, as `make test` does) and the project
//! venv (`scripts/setup.sh`).

mod support;

use std::path::Path;

use millrace_crds::spec::ExecutionProvider;
use millrace_scorer::model::{Model, ModelError};

const FEATURES: usize = 8;
const ROWS: usize = 64;

/// Makes the model and its expected outputs with the venv's onnx and onnxruntime.
fn make_model(dir: &Path) -> (Vec<f32>, Vec<f32>) {
    support::make_model(dir, FEATURES, ROWS)
}

fn load(path: &Path, features: usize, output: Option<&str>) -> Result<Model, ModelError> {
    Model::load(
        path,
        features,
        None,
        output,
        &[ExecutionProvider::Cuda, ExecutionProvider::Cpu],
    )
}

#[test]
fn predictions_match_onnx_runtime_row_for_row_batched_or_not() {
    let dir = tempfile::tempdir().expect("tmp");
    let (rows, expected) = make_model(dir.path());
    let model = load(&dir.path().join("model.onnx"), FEATURES, Some("y")).expect("load");
    // No GPU provider is compiled into this build: CPU is the last resort, and says so.
    assert_eq!(model.provider(), ExecutionProvider::Cpu);

    let batched = model.predict(&rows).expect("batch");
    assert_eq!(batched.len(), ROWS);
    for (i, (got, want)) in batched.iter().zip(&expected).enumerate() {
        assert!((got - want).abs() < 1e-6, "row {i}: {got} != {want}");
    }
    for (i, row) in rows.chunks(FEATURES).enumerate() {
        let single = model.predict(row).expect("single row");
        assert_eq!(
            single,
            [batched[i]],
            "row {i} alone equals row {i} in a batch"
        );
    }
}

#[test]
fn a_model_that_does_not_match_the_spec_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    make_model(dir.path());
    let path = dir.path().join("model.onnx");
    match load(&path, FEATURES + 1, None) {
        Err(ModelError::Contract(message)) => assert!(message.contains("[N, 9]"), "{message}"),
        other => panic!("a feature-count mismatch must be refused, got {other:?}"),
    }
    match load(&path, FEATURES, Some("probability")) {
        Err(ModelError::Contract(message)) => assert!(message.contains("\"y\""), "{message}"),
        other => panic!("an unknown output must be refused, got {other:?}"),
    }
    let model = load(&path, FEATURES, None).expect("defaults to the first output");
    match model.predict(&[0.0; FEATURES + 3]) {
        Err(ModelError::Shape { features, got }) => {
            assert_eq!((features, got), (FEATURES, FEATURES + 3))
        }
        other => panic!("a ragged input must be refused, got {other:?}"),
    }
}

#[test]
fn a_missing_or_corrupt_file_is_a_load_error() {
    let dir = tempfile::tempdir().expect("tmp");
    assert!(matches!(
        load(&dir.path().join("absent.onnx"), FEATURES, None),
        Err(ModelError::Load { .. })
    ));
    let corrupt = dir.path().join("corrupt.onnx");
    std::fs::write(&corrupt, b"not a model").expect("write");
    assert!(matches!(
        load(&corrupt, FEATURES, None),
        Err(ModelError::Load { .. })
    ));
}
