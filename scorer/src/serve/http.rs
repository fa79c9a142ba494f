//! The HTTP API: predictions by entity id, the Open Inference Protocol v2 routes (see
//! [`super::oip`]), metrics and probes.
//!
//! | route | |
//! |---|---|
//! | `GET /v1/predictions/{id}` | one entity through the lookup chain |
//! | `POST /v1/predictions:batchGet` | `{"ids": [...], "features": {id: {input: value}}}` |
//! | `/v2/...` | Open Inference Protocol v2 (health, metadata, raw-tensor infer) |
//! | `GET /metrics`, `/livez`, `/readyz` | Prometheus text; liveness; readiness |
//!
//! Bad input is a 4xx with `{"error": reason}`: an invalid id (length, characters), too many
//! ids, a body over the limit (413), malformed JSON or a wrong content type. A prediction
//! nothing could produce and no default covers is a 503 naming what failed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, http};
use millrace_crds::keys::{now_ms, validate_entity_id};
use serde::{Deserialize, Serialize};

use super::chain::{Answer, Degradation, Scorer, Source, Unanswered};
use super::metrics::Metrics;
use super::oip;
use super::settings::RequestLimits;
use crate::model::Model;

/// What every handler sees.
pub struct AppState {
    /// The lookup chain.
    pub scorer: Scorer,
    /// The model (for metadata); none on the split topology's cache tier.
    pub model: Option<Arc<Model>>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The request limits.
    pub limits: RequestLimits,
    /// Model loaded and warmed up, and not shutting down.
    pub ready: AtomicBool,
}

/// The router.
pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.limits.max_body_bytes;
    Router::new()
        .route("/v1/predictions/{id}", get(get_prediction))
        .route("/v1/predictions:batchGet", post(batch_get))
        .merge(oip::routes())
        .route("/metrics", get(metrics))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// A 4xx or 5xx with a JSON reason (the v2 protocol's error shape, used everywhere).
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    #[derive(Serialize)]
    struct Body {
        error: String,
    }
    (
        status,
        Json(Body {
            error: message.into(),
        }),
    )
        .into_response()
}

/// Turns an extractor rejection into our error shape, keeping its status (400, 413, 415, 422).
pub fn rejection(metrics: &Metrics, status: StatusCode, message: String) -> Response {
    metrics.rejected(match status {
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "content_type",
        _ => "malformed",
    });
    error(status, message)
}

async fn not_found(uri: http::Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no route for {}", uri.path()),
    )
}

/// One prediction as JSON.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PredictionBody {
    id: String,
    prediction: f32,
    source: Source,
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    age_ms: Option<u64>,
    stale: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    degraded: Vec<Degradation>,
}

/// An entity nothing could answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UnansweredBody {
    id: String,
    error: String,
    degraded: Vec<Degradation>,
}

fn prediction_body(id: &str, answer: Answer, version: &str) -> PredictionBody {
    PredictionBody {
        id: id.to_string(),
        prediction: answer.value,
        source: answer.source,
        model_version: version.to_string(),
        age_ms: answer.computed_at_ms.map(|at| now_ms().saturating_sub(at)),
        stale: answer.stale,
        degraded: answer.degraded,
    }
}

fn unanswered_body(id: &str, unanswered: Unanswered) -> UnansweredBody {
    UnansweredBody {
        id: id.to_string(),
        error: "no tier could answer and serving.fallback.default is not set".into(),
        degraded: unanswered.degraded,
    }
}

async fn get_prediction(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match id {
        Ok(Path(id)) => id,
        Err(e) => return rejection(&state.metrics, e.status(), e.body_text()),
    };
    if let Err(e) = validate_entity_id(&id) {
        state.metrics.rejected("invalid_id");
        return error(StatusCode::BAD_REQUEST, format!("invalid entity id: {e}"));
    }
    let version = &state.scorer.settings().model_version;
    match state.scorer.predict(&id, &HashMap::new()).await {
        Ok(answer) => Json(prediction_body(&id, answer, version)).into_response(),
        Err(unanswered) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(unanswered_body(&id, unanswered)),
        )
            .into_response(),
    }
}

/// The `batchGet` request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchGetRequest {
    ids: Vec<String>,
    #[serde(default)]
    features: HashMap<String, HashMap<String, f32>>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum BatchItem {
    Answered(PredictionBody),
    Unanswered(UnansweredBody),
}

#[derive(Debug, Serialize)]
struct BatchGetResponse {
    predictions: Vec<BatchItem>,
}

async fn batch_get(
    State(state): State<Arc<AppState>>,
    body: Result<Json<BatchGetRequest>, JsonRejection>,
) -> Response {
    let request = match body {
        Ok(Json(request)) => request,
        Err(e) => return rejection(&state.metrics, e.status(), e.body_text()),
    };
    let limit = state.limits.max_ids_per_batch;
    if request.ids.is_empty() {
        state.metrics.rejected("no_ids");
        return error(StatusCode::BAD_REQUEST, "ids: at least one id is required");
    }
    if request.ids.len() > limit {
        state.metrics.rejected("too_many_ids");
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "ids: {} ids; at most {limit} per request",
                request.ids.len()
            ),
        );
    }
    for (index, id) in request.ids.iter().enumerate() {
        if let Err(e) = validate_entity_id(id) {
            state.metrics.rejected("invalid_id");
            return error(StatusCode::BAD_REQUEST, format!("ids[{index}]: {e}"));
        }
    }
    let inputs = state.scorer.settings().features.inputs();
    for (id, values) in &request.features {
        if !request.ids.contains(id) {
            state.metrics.rejected("features_for_unknown_id");
            return error(
                StatusCode::BAD_REQUEST,
                format!("features.{id}: the id is not in ids"),
            );
        }
        if let Some(name) = values.keys().find(|name| !inputs.contains(name)) {
            state.metrics.rejected("unknown_feature");
            return error(
                StatusCode::BAD_REQUEST,
                format!("features.{id}.{name}: not a model input; inputs are {inputs:?}"),
            );
        }
        if let Some((name, _)) = values.iter().find(|(_, v)| !v.is_finite()) {
            state.metrics.rejected("non_finite_feature");
            return error(
                StatusCode::BAD_REQUEST,
                format!("features.{id}.{name}: not a finite number"),
            );
        }
    }
    let empty = HashMap::new();
    let version = &state.scorer.settings().model_version;
    // Every id announced before any is looked up: the misses among them share runs.
    let answers = futures::future::join_all(request.ids.iter().map(|id| {
        let supplied = request.features.get(id).unwrap_or(&empty);
        let coming = state.scorer.announce();
        state.scorer.predict_announced(id, supplied, coming)
    }))
    .await;
    let predictions = request
        .ids
        .iter()
        .zip(answers)
        .map(|(id, answer)| match answer {
            Ok(answer) => BatchItem::Answered(prediction_body(id, answer, version)),
            Err(unanswered) => BatchItem::Unanswered(unanswered_body(id, unanswered)),
        })
        .collect();
    Json(BatchGetResponse { predictions }).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match state.metrics.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics"),
    }
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}
