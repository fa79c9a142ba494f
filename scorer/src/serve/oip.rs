//! The Open Inference Protocol v2 REST routes (KServe, Triton, Seldon): health, metadata
//! and raw-tensor inference through the same micro-batcher as real-time misses.
//!
//! - `GET /v2/health/live`, `/v2/health/ready`, `/v2/models/{name}[/versions/{v}]/ready`:
//!   200 when true, 400 when false (the protocol asks for a 4xx), empty-object bodies.
//! - `GET /v2`: server metadata; `GET /v2/models/{name}[/versions/{v}]`: model metadata,
//!   with `parameters.execution_provider` saying which provider loaded the model.
//! - `POST /v2/models/{name}[/versions/{v}]/infer`: one `FP32` input named like the model's
//!   input, shape `[N, features]`, `data` flat (row-major) or nested; answers the model's
//!   first output column as `[N, 1]`. Cache tiers are not involved: a raw tensor names no
//!   entity.
//!
//! Errors are `{"error": reason}`: 404 for an unknown model or version, 400 for a request
//! that does not fit the model (name, datatype, shape, data length, non-numbers), 503 when
//! the inference queue is full or the model not ready, 500 only if the model itself fails.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::batcher::{InferError, MicroBatcher};
use super::http::{AppState, error, rejection};
use crate::model::Model;

/// The v2 routes.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route(
            "/v2/health/live",
            get(|| async { Json(serde_json::json!({})) }),
        )
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_metadata_v),
        )
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready_v),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_v))
}

#[derive(Serialize)]
struct ServerMetadata {
    name: &'static str,
    version: &'static str,
    extensions: Vec<String>,
}

async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata {
        name: "millrace-scorer",
        version: env!("CARGO_PKG_VERSION"),
        extensions: Vec::new(),
    })
}

fn ready_response(ready: bool) -> Response {
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    (status, Json(serde_json::json!({}))).into_response()
}

async fn server_ready(State(state): State<Arc<AppState>>) -> Response {
    ready_response(state.ready.load(Ordering::Relaxed))
}

/// The model and its micro-batcher; a 503 saying where to go on the split topology's cache
/// tier, which has neither.
fn loaded(state: &AppState) -> Result<(&Model, &MicroBatcher), Box<Response>> {
    match (state.model.as_deref(), state.scorer.batcher()) {
        (Some(model), Some(batcher)) => Ok((model, batcher)),
        _ => Err(Box::new(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this pod is the split topology's cache tier and holds no model; send Open Inference Protocol requests to the compute tier's Service ({name}-compute)",
        ))),
    }
}

/// Checks the model name (and version, when given) against the loaded model.
fn check_model(state: &AppState, name: &str, version: Option<&str>) -> Result<(), Box<Response>> {
    let settings = state.scorer.settings();
    if name != settings.model_name {
        state.metrics.rejected("unknown_model");
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            format!(
                "unknown model {name:?}; this server serves {:?}",
                settings.model_name
            ),
        )));
    }
    match version {
        Some(v) if v != settings.model_version => {
            state.metrics.rejected("unknown_version");
            Err(Box::new(error(
                StatusCode::NOT_FOUND,
                format!(
                    "model {name:?} has no version {v:?}; the loaded version is {:?}",
                    settings.model_version
                ),
            )))
        }
        _ => Ok(()),
    }
}

async fn model_ready(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    ready_model(&state, &name, None)
}

async fn model_ready_v(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    ready_model(&state, &name, Some(&version))
}

fn ready_model(state: &AppState, name: &str, version: Option<&str>) -> Response {
    match check_model(state, name, version) {
        Ok(()) => ready_response(state.ready.load(Ordering::Relaxed)),
        Err(response) => *response,
    }
}

#[derive(Serialize)]
struct TensorMetadata {
    name: String,
    datatype: &'static str,
    shape: [i64; 2],
}

#[derive(Serialize)]
struct ModelMetadata {
    name: String,
    versions: Vec<String>,
    platform: &'static str,
    inputs: Vec<TensorMetadata>,
    outputs: Vec<TensorMetadata>,
    parameters: serde_json::Map<String, Value>,
}

async fn model_metadata(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    metadata(&state, &name, None)
}

async fn model_metadata_v(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    metadata(&state, &name, Some(&version))
}

fn metadata(state: &AppState, name: &str, version: Option<&str>) -> Response {
    if let Err(response) = check_model(state, name, version) {
        return *response;
    }
    let settings = state.scorer.settings();
    let model = match loaded(state) {
        Ok((model, _)) => model,
        Err(response) => return *response,
    };
    let mut parameters = serde_json::Map::new();
    parameters.insert(
        "execution_provider".into(),
        Value::String(format!("{:?}", model.provider()).to_lowercase()),
    );
    parameters.insert(
        "feature_names".into(),
        Value::from(settings.features.inputs().to_vec()),
    );
    Json(ModelMetadata {
        name: settings.model_name.clone(),
        versions: vec![settings.model_version.clone()],
        platform: "onnxruntime_onnx",
        inputs: vec![TensorMetadata {
            name: model.input_name().to_string(),
            datatype: "FP32",
            shape: [-1, model.features() as i64],
        }],
        outputs: vec![TensorMetadata {
            name: model.output_name().to_string(),
            datatype: "FP32",
            shape: [-1, 1],
        }],
        parameters,
    })
    .into_response()
}

/// An inference request (the protocol's `$inference_request`). Its optional `parameters`
/// (request-level and per input) carry nothing this server acts on; serde skips them.
#[derive(Debug, Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<RequestInput>,
    #[serde(default)]
    outputs: Option<Vec<RequestOutput>>,
}

#[derive(Debug, Deserialize)]
struct RequestInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    data: Value,
}

#[derive(Debug, Deserialize)]
struct RequestOutput {
    name: String,
}

#[derive(Debug, Serialize)]
struct InferResponse {
    model_name: String,
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    outputs: Vec<ResponseOutput>,
}

#[derive(Debug, Serialize)]
struct ResponseOutput {
    name: String,
    shape: [usize; 2],
    datatype: &'static str,
    data: Vec<f32>,
}

async fn infer(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: Result<Json<InferRequest>, JsonRejection>,
) -> Response {
    run_infer(&state, &name, None, body).await
}

async fn infer_v(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
    body: Result<Json<InferRequest>, JsonRejection>,
) -> Response {
    run_infer(&state, &name, Some(&version), body).await
}

async fn run_infer(
    state: &AppState,
    name: &str,
    version: Option<&str>,
    body: Result<Json<InferRequest>, JsonRejection>,
) -> Response {
    if let Err(response) = check_model(state, name, version) {
        return *response;
    }
    let request = match body {
        Ok(Json(request)) => request,
        Err(e) => return rejection(&state.metrics, e.status(), e.body_text()),
    };
    if !state.ready.load(Ordering::Relaxed) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the model is not ready");
    }
    let (model, batcher) = match loaded(state) {
        Ok(loaded) => loaded,
        Err(response) => return *response,
    };
    let rows = match tensor_rows(model, state.limits.max_infer_rows, &request) {
        Ok(rows) => rows,
        Err(message) => {
            state.metrics.rejected("bad_tensor");
            return error(StatusCode::BAD_REQUEST, message);
        }
    };
    let n = rows.len() / model.features();
    let deadline = Instant::now()
        + state
            .scorer
            .settings()
            .latency_budget
            .max(std::time::Duration::from_secs(1));
    match batcher.infer(rows, deadline).await {
        Ok(values) => Json(InferResponse {
            model_name: state.scorer.settings().model_name.clone(),
            model_version: state.scorer.settings().model_version.clone(),
            id: request.id,
            outputs: vec![ResponseOutput {
                name: model.output_name().to_string(),
                shape: [n, 1],
                datatype: "FP32",
                data: values,
            }],
        })
        .into_response(),
        Err(InferError::Overloaded) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the inference queue is full; retry",
        ),
        Err(InferError::Timeout) => error(StatusCode::SERVICE_UNAVAILABLE, "inference timed out"),
        Err(InferError::Stopped) => error(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
        Err(InferError::Model(message)) => error(StatusCode::INTERNAL_SERVER_ERROR, message),
    }
}

/// Checks the request against the model and returns its rows, row-major.
fn tensor_rows(model: &Model, max_rows: usize, request: &InferRequest) -> Result<Vec<f32>, String> {
    let features = model.features();
    let [input] = request.inputs.as_slice() else {
        return Err(format!(
            "inputs: the model takes exactly one input ({:?}), got {}",
            model.input_name(),
            request.inputs.len()
        ));
    };
    if input.name != model.input_name() {
        return Err(format!(
            "inputs[0].name: {:?} is not an input of the model; it has {:?}",
            input.name,
            model.input_name()
        ));
    }
    if input.datatype != "FP32" {
        return Err(format!(
            "inputs[0].datatype: {:?}; the model's input is FP32",
            input.datatype
        ));
    }
    match input.shape.as_slice() {
        [n, f] if *f == features as i64 && *n >= 1 && *n <= max_rows as i64 => {}
        [n, f] if *f == features as i64 && (*n < 1 || *n > max_rows as i64) => {
            return Err(format!(
                "inputs[0].shape: {n} rows; between 1 and {max_rows} are allowed"
            ));
        }
        other => {
            return Err(format!(
                "inputs[0].shape: {other:?}; the model's input is [N, {features}]"
            ));
        }
    }
    if let Some(outputs) = &request.outputs
        && let Some(bad) = outputs.iter().find(|o| o.name != model.output_name())
    {
        return Err(format!(
            "outputs: {:?} is not an output of the model; it has {:?}",
            bad.name,
            model.output_name()
        ));
    }
    let expected = input.shape.iter().product::<i64>() as usize;
    let mut rows = Vec::with_capacity(expected);
    flatten(&input.data, &mut rows, expected, 0)?;
    if rows.len() != expected {
        return Err(format!(
            "inputs[0].data: {} values; shape {:?} needs {expected}",
            rows.len(),
            input.shape
        ));
    }
    Ok(rows)
}

/// Flattens nested JSON arrays of numbers, refusing anything else and stopping early once
/// there are more values than the shape allows (a huge body cannot make a huge vector).
fn flatten(value: &Value, out: &mut Vec<f32>, limit: usize, depth: usize) -> Result<(), String> {
    match value {
        Value::Number(n) => {
            let v = n
                .as_f64()
                .map(|v| v as f32)
                .filter(|v| v.is_finite())
                .ok_or_else(|| format!("inputs[0].data: {n} is not a finite FP32 value"))?;
            if out.len() >= limit {
                return Err(format!(
                    "inputs[0].data: more values than the shape's {limit}"
                ));
            }
            out.push(v);
            Ok(())
        }
        Value::Array(items) if depth < 2 => items
            .iter()
            .try_for_each(|item| flatten(item, out, limit, depth + 1)),
        Value::Array(_) => {
            Err("inputs[0].data: nested deeper than the shape's 2 dimensions".into())
        }
        other => Err(format!(
            "inputs[0].data: {} is not a number",
            match other {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::String(_) => "a string",
                Value::Object(_) => "an object",
                _ => "a value",
            }
        )),
    }
}
