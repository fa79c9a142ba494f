//! The Argo CD health check (argocd/resource_customizations/millrace.dev/InferenceDeployment)
//! run by a real Lua 5.1 interpreter (`lua5.1`, the dialect Argo CD embeds) on every fixture
//! of its `health_test.yaml`, Argo CD's own test format; and the argocd-cm snippet users
//! install holds the same script.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn check_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../argocd/resource_customizations/millrace.dev/InferenceDeployment")
}

/// `value` as a Lua table constructor; JSON null becomes an absent key, as in Argo CD.
fn lua_literal(value: &Value) -> String {
    match value {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => lua_string(s),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(lua_literal).collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Object(fields) => {
            let fields: Vec<String> = fields
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("[{}] = {}", lua_string(k), lua_literal(v)))
                .collect();
            format!("{{{}}}", fields.join(", "))
        }
    }
}

fn lua_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Runs health.lua with `obj` set to `object`; returns (status, message).
fn health_of(object: &Value) -> (String, String) {
    let script = check_dir().join("health.lua");
    let program = format!(
        "obj = {}\nlocal hs = dofile({})\nio.write(hs.status, \"\\n\", hs.message or \"\")\n",
        lua_literal(object),
        lua_string(&script.to_string_lossy())
    );
    let output = Command::new("lua5.1")
        .arg("-e")
        .arg(&program)
        .output()
        .expect("lua5.1 runs (scripts/setup.sh installs it)");
    assert!(
        output.status.success(),
        "health.lua failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
    let (status, message) = stdout.split_once('\n').expect("status and message");
    (status.to_string(), message.to_string())
}

#[test]
fn health_check_gives_each_fixture_its_status() {
    let dir = check_dir();
    let tests: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(dir.join("health_test.yaml")).expect("health_test.yaml"),
    )
    .expect("health_test.yaml is YAML");
    let cases = tests["tests"].as_array().expect("a tests list");
    let mut statuses: Vec<String> = Vec::new();
    for case in cases {
        let input = case["inputPath"].as_str().expect("inputPath");
        let object: Value = serde_yaml_ng::from_str(
            &std::fs::read_to_string(dir.join(input)).expect("fixture readable"),
        )
        .expect("fixture is YAML");
        let (status, message) = health_of(&object);
        assert_eq!(
            (status.as_str(), message.as_str()),
            (
                case["healthStatus"]["status"].as_str().expect("status"),
                case["healthStatus"]["message"].as_str().expect("message"),
            ),
            "{input}"
        );
        statuses.push(status);
    }
    for wanted in ["Healthy", "Progressing", "Degraded", "Suspended"] {
        assert!(
            statuses.iter().any(|s| s == wanted),
            "no fixture covers {wanted}"
        );
    }
}

#[test]
fn argocd_cm_snippet_holds_the_tested_script() {
    let script = std::fs::read_to_string(check_dir().join("health.lua")).expect("health.lua");
    let snippet: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../argocd/argocd-cm.yaml"),
        )
        .expect("argocd-cm.yaml"),
    )
    .expect("argocd-cm.yaml is YAML");
    let embedded =
        snippet["data"]["resource.customizations.health.millrace.dev_InferenceDeployment"]
            .as_str()
            .expect("the health key");
    assert_eq!(
        embedded, script,
        "argocd/argocd-cm.yaml differs from health.lua"
    );
}
