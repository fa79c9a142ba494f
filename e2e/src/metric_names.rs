//! Checks that dashboards and alert rules only read metrics a binary really exports: the
//! names a text mentions, against the families in a Prometheus text exposition.

use std::collections::BTreeSet;

/// Every metric name starting with `prefix` that `text` (PromQL, dashboard JSON) mentions.
pub fn referenced(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The names in `referenced` that no family of `exposition` provides, allowing the series
/// suffixes Prometheus adds (`_total`, `_bucket`, `_sum`, `_count`).
pub fn missing(referenced: &BTreeSet<String>, exposition: &str) -> Vec<String> {
    let families: BTreeSet<&str> = exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    referenced
        .iter()
        .filter(|name| {
            let base = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            !families.contains(name.as_str()) && !families.contains(base)
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_names_and_what_is_missing() {
        let promql = r#"rate(app_requests_total{x="y"}[5m]) / app_gone_seconds_bucket"#;
        let names = referenced(promql, "app_");
        assert_eq!(
            names.iter().map(String::as_str).collect::<Vec<_>>(),
            ["app_gone_seconds_bucket", "app_requests_total"]
        );
        let exposition = "# HELP app_requests x\n# TYPE app_requests counter\n";
        assert_eq!(missing(&names, exposition), ["app_gone_seconds_bucket"]);
    }
}
