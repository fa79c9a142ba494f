//! Validate: the pure checks the API server's CEL rules cannot make. A failure here stops the
//! pipeline before anything is applied and surfaces as a `Degraded` condition and an event.

use kube::ResourceExt;
use millrace_crds::InferenceDeployment;
use millrace_crds::spec::RequestTimeFeature;

use crate::build::batch::manual_job_name;
use crate::build::names::{batch_name, scorer_name};

/// One thing wrong with a spec, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The field, as a path from the resource root (`spec.batch.timeZone`).
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem with `resource` that CEL could not catch; empty when it is valid.
pub fn validate(resource: &InferenceDeployment) -> Vec<Invalid> {
    let mut problems = Vec::new();
    let mut invalid = |field: &str, message: String| {
        problems.push(Invalid {
            field: field.to_string(),
            message,
        })
    };
    let spec = &resource.spec;

    // Children are named after the resource; each name must be a valid DNS label.
    let longest = [
        scorer_name(resource),
        batch_name(resource),
        manual_job_name(resource, ""),
    ];
    if let Some(name) = longest.iter().find(|name| name.len() > 63) {
        invalid(
            "metadata.name",
            format!("is too long: the child {name:?} would exceed 63 characters; use at most 36"),
        );
    }
    if !resource
        .name_any()
        .starts_with(|c: char| c.is_ascii_lowercase())
    {
        invalid(
            "metadata.name",
            "must start with a lowercase letter: it names the scorer Service".to_string(),
        );
    }

    if jiff::tz::TimeZone::get(&spec.features.time_zone).is_err() {
        invalid(
            "spec.features.timeZone",
            format!("{:?} is not an IANA time zone", spec.features.time_zone),
        );
    }
    if let Some(batch) = &spec.batch
        && jiff::tz::TimeZone::get(&batch.time_zone).is_err()
    {
        invalid(
            "spec.batch.timeZone",
            format!("{:?} is not an IANA time zone", batch.time_zone),
        );
    }

    for feature in &spec.features.request_time {
        let name = request_time_name(*feature);
        if !spec.model.inputs.iter().any(|input| input == name) {
            invalid(
                "spec.features.requestTime",
                format!(
                    "lists {name}, which is not in spec.model.inputs, so it would never be used"
                ),
            );
        }
    }
    problems
}

/// The feature name a request-time feature fills in.
pub fn request_time_name(feature: RequestTimeFeature) -> &'static str {
    match feature {
        RequestTimeFeature::HourOfDay => "hourOfDay",
        RequestTimeFeature::DayOfWeek => "dayOfWeek",
        RequestTimeFeature::IsWeekend => "isWeekend",
    }
}
