//! Real-time features: where each model input comes from, and the row a miss is scored on.
//!
//! For every input, in order of precedence:
//! 1. a value supplied in the request (`batchGet`'s `features`), so callers can send what
//!    they know fresher than any store;
//! 2. a request-time feature (`hourOfDay` 0-23, `dayOfWeek` 0 = Monday … 6, `isWeekend` 0/1)
//!    computed from the clock in `features.timeZone`, when the input has that name and
//!    `features.requestTime` lists it;
//! 3. the online store: field `<input>` of the Redis hash `<hashPrefix><id>`;
//! 4. otherwise the input is **missing**: under `missing.policy: fill` it takes
//!    `missing.fillValue` (and `millrace_scorer_missing_features_total{feature}` counts it);
//!    under `fallback` the entity is not scored and the request falls to the default.
//!
//! An online-store value that is not a finite number counts as missing: scoring on a
//! misread value would be a silently wrong prediction.

use std::collections::HashMap;

use jiff::Timestamp;
use jiff::civil::Weekday;
use jiff::tz::TimeZone;
use millrace_crds::spec::{FeaturesSpec, MissingFeaturePolicy, RequestTimeFeature};

/// The feature sources cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    /// `features.timeZone` is not an IANA zone this build knows.
    #[error("features.timeZone {zone:?} is not a known IANA time zone: {message}")]
    TimeZone {
        /// The zone.
        zone: String,
        /// Why.
        message: String,
    },
}

/// Where one input's value comes from when nothing is supplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Clock(RequestTimeFeature),
    Online,
}

/// How to build a model row for one entity.
#[derive(Debug, Clone)]
pub struct FeaturePlan {
    inputs: Vec<String>,
    sources: Vec<Source>,
    online_prefix: Option<String>,
    online_fields: Vec<String>,
    time_zone: TimeZone,
    policy: MissingFeaturePolicy,
    fill_value: f32,
}

/// A row ready for the model, and which inputs had to be filled.
#[derive(Debug, Clone, PartialEq)]
pub struct Assembled {
    /// One value per model input, in model order.
    pub row: Vec<f32>,
    /// Indexes of inputs no source supplied.
    pub missing: Vec<usize>,
}

impl FeaturePlan {
    /// The plan for `inputs` (model order) under `spec`.
    pub fn new(inputs: &[String], spec: &FeaturesSpec) -> Result<Self, FeatureError> {
        let time_zone = TimeZone::get(&spec.time_zone).map_err(|e| FeatureError::TimeZone {
            zone: spec.time_zone.clone(),
            message: e.to_string(),
        })?;
        let sources: Vec<Source> = inputs
            .iter()
            .map(|name| {
                spec.request_time
                    .iter()
                    .copied()
                    .find(|feature| request_time_name(*feature) == name)
                    .map_or(Source::Online, Source::Clock)
            })
            .collect();
        let online_prefix = spec.online.as_ref().map(|o| o.hash_prefix.clone());
        let online_fields = inputs
            .iter()
            .zip(&sources)
            .filter(|(_, source)| **source == Source::Online)
            .map(|(name, _)| name.clone())
            .collect();
        Ok(Self {
            inputs: inputs.to_vec(),
            sources,
            online_prefix,
            online_fields,
            time_zone,
            policy: spec.missing.policy,
            fill_value: spec.missing.fill_value,
        })
    }

    /// The model inputs, in order.
    pub fn inputs(&self) -> &[String] {
        &self.inputs
    }

    /// The missing-feature policy.
    pub fn policy(&self) -> MissingFeaturePolicy {
        self.policy
    }

    /// The online store's hash for `id`, when an online store is configured and some input
    /// is read from it.
    pub fn online_key(&self, id: &str) -> Option<String> {
        match &self.online_prefix {
            Some(prefix) if !self.online_fields.is_empty() => Some(format!("{prefix}{id}")),
            _ => None,
        }
    }

    /// The hash fields to read, in the order [`FeaturePlan::assemble`] expects their values.
    pub fn online_fields(&self) -> &[String] {
        &self.online_fields
    }

    /// Whether every input that is not computed from the clock is in `supplied`: then the
    /// online store need not be read at all.
    pub fn fully_supplied(&self, supplied: &HashMap<String, f32>) -> bool {
        self.online_fields.iter().all(|f| supplied.contains_key(f))
    }

    /// Builds the row: `supplied` values, clock features at `now`, then `online` (the values
    /// of [`FeaturePlan::online_fields`], in that order; empty when the store was not read).
    pub fn assemble(
        &self,
        supplied: &HashMap<String, f32>,
        online: &[Option<String>],
        now: Timestamp,
    ) -> Assembled {
        let zoned = now.to_zoned(self.time_zone.clone());
        let mut online_values = online.iter();
        let mut row = Vec::with_capacity(self.inputs.len());
        let mut missing = Vec::new();
        for (index, (name, source)) in self.inputs.iter().zip(&self.sources).enumerate() {
            // Keep the online iterator aligned with online_fields whatever wins.
            let stored = match source {
                Source::Online => online_values.next().and_then(Option::as_deref),
                Source::Clock(_) => None,
            };
            let value = supplied.get(name).copied().or(match source {
                Source::Clock(feature) => Some(clock_feature(*feature, &zoned)),
                Source::Online => stored
                    .and_then(|text| text.trim().parse::<f32>().ok())
                    .filter(|v| v.is_finite()),
            });
            match value {
                Some(v) => row.push(v),
                None => {
                    missing.push(index);
                    row.push(self.fill_value);
                }
            }
        }
        Assembled { row, missing }
    }
}

/// The input name a request-time feature fills.
pub fn request_time_name(feature: RequestTimeFeature) -> &'static str {
    match feature {
        RequestTimeFeature::HourOfDay => "hourOfDay",
        RequestTimeFeature::DayOfWeek => "dayOfWeek",
        RequestTimeFeature::IsWeekend => "isWeekend",
    }
}

fn clock_feature(feature: RequestTimeFeature, zoned: &jiff::Zoned) -> f32 {
    match feature {
        RequestTimeFeature::HourOfDay => f32::from(zoned.hour() as u8),
        RequestTimeFeature::DayOfWeek => f32::from(zoned.weekday().to_monday_zero_offset() as u8),
        RequestTimeFeature::IsWeekend => {
            if matches!(zoned.weekday(), Weekday::Saturday | Weekday::Sunday) {
                1.0
            } else {
                0.0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use millrace_crds::spec::{MissingFeatures, OnlineFeatures};

    fn spec(policy: MissingFeaturePolicy, zone: &str) -> FeaturesSpec {
        FeaturesSpec {
            online: Some(OnlineFeatures {
                hash_prefix: "features:".into(),
            }),
            request_time: vec![RequestTimeFeature::HourOfDay, RequestTimeFeature::IsWeekend],
            time_zone: zone.into(),
            missing: MissingFeatures {
                policy,
                fill_value: -1.0,
            },
            ..FeaturesSpec::default()
        }
    }

    fn inputs() -> Vec<String> {
        ["tenure", "hourOfDay", "spend", "isWeekend"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn supplied_beats_clock_beats_online_and_missing_is_filled() {
        let plan =
            FeaturePlan::new(&inputs(), &spec(MissingFeaturePolicy::Fill, "UTC")).expect("plan");
        assert_eq!(plan.online_key("u1").as_deref(), Some("features:u1"));
        assert_eq!(plan.online_fields(), ["tenure", "spend"]);
        // Saturday 2026-11-28 23:30 UTC.
        let now: Timestamp = "2026-11-28T23:30:00Z".parse().expect("ts");
        let online = [Some("12".to_string()), None];
        let got = plan.assemble(&HashMap::new(), &online, now);
        assert_eq!(got.row, vec![12.0, 23.0, -1.0, 1.0]);
        assert_eq!(got.missing, vec![2]);

        let supplied = HashMap::from([("spend".to_string(), 4.5), ("hourOfDay".to_string(), 3.0)]);
        let got = plan.assemble(&supplied, &online, now);
        assert_eq!(got.row, vec![12.0, 3.0, 4.5, 1.0]);
        assert!(got.missing.is_empty());
        assert!(!plan.fully_supplied(&supplied));
    }

    #[test]
    fn request_time_features_follow_the_time_zone() {
        let plan = FeaturePlan::new(&inputs(), &spec(MissingFeaturePolicy::Fill, "Asia/Tokyo"))
            .expect("plan");
        // 23:30 UTC Saturday is 08:30 Sunday in Tokyo.
        let now: Timestamp = "2026-11-28T23:30:00Z".parse().expect("ts");
        let got = plan.assemble(&HashMap::new(), &[], now);
        assert_eq!(got.row[1], 8.0);
        assert_eq!(got.row[3], 1.0);
        // Monday 09:00 UTC is not a weekend.
        let now: Timestamp = "2026-11-30T09:00:00Z".parse().expect("ts");
        assert_eq!(plan.assemble(&HashMap::new(), &[], now).row[3], 0.0);
    }

    #[test]
    fn unreadable_online_values_are_missing_not_misread() {
        let plan = FeaturePlan::new(&inputs(), &spec(MissingFeaturePolicy::Fallback, "UTC"))
            .expect("plan");
        let online = [Some("NaN".to_string()), Some("twelve".to_string())];
        let got = plan.assemble(&HashMap::new(), &online, Timestamp::UNIX_EPOCH);
        assert_eq!(got.missing, vec![0, 2]);
        assert_eq!(plan.policy(), MissingFeaturePolicy::Fallback);
    }

    #[test]
    fn day_of_week_counts_from_monday() {
        let inputs = vec!["dayOfWeek".to_string()];
        let mut features = spec(MissingFeaturePolicy::Fill, "UTC");
        features.request_time = vec![RequestTimeFeature::DayOfWeek];
        features.online = None;
        let plan = FeaturePlan::new(&inputs, &features).expect("plan");
        assert_eq!(plan.online_key("u"), None, "nothing to read from a store");
        let monday: Timestamp = "2026-11-30T12:00:00Z".parse().expect("ts");
        let sunday: Timestamp = "2026-11-29T12:00:00Z".parse().expect("ts");
        assert_eq!(plan.assemble(&HashMap::new(), &[], monday).row, vec![0.0]);
        assert_eq!(plan.assemble(&HashMap::new(), &[], sunday).row, vec![6.0]);
    }

    #[test]
    fn an_unknown_time_zone_is_refused() {
        let err = FeaturePlan::new(&inputs(), &spec(MissingFeaturePolicy::Fill, "Mars/Olympus"))
            .expect_err("unknown zone");
        assert!(err.to_string().contains("Mars/Olympus"), "{err}");
    }
}
