//! The deployment files under `deploy/` name only series the library
//! emits: the Grafana dashboard's queries and the Prometheus alert rules
//! are checked against [`amqp_idempotency::metrics::SERIES`], so that a
//! renamed metric cannot leave a panel or an alert silently empty.

use std::collections::BTreeSet;
use std::path::Path;

use amqp_idempotency::metrics::{SERIES, STORE_SECONDS};
use serde_json::Value;

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|err| panic!("read {}: {err}", full.display()))
}

/// Every `idempotency_*` name in `text`, as written.
fn names(text: &str) -> BTreeSet<String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("idempotency_") {
        let starts_a_name = !rest[..at].ends_with(is_name);
        let tail = &rest[at..];
        let end = tail.find(|c: char| !is_name(c)).unwrap_or(tail.len());
        if starts_a_name {
            found.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    found
}

/// The series a name in a query stands for: a histogram's `_bucket`,
/// `_sum` and `_count` (or its quantiles, under its own name) are its own.
fn series_of(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| {
            name.strip_suffix(suffix)
                .filter(|base| *base == STORE_SECONDS)
        })
        .unwrap_or(name)
}

fn unknown(found: &BTreeSet<String>) -> Vec<&str> {
    found
        .iter()
        .map(|name| series_of(name))
        .filter(|series| !SERIES.contains(series))
        .collect()
}

/// Every query target of the dashboard's panels, rows included.
fn targets(panels: &[Value]) -> Vec<&Value> {
    let mut found = Vec::new();
    for panel in panels {
        if let Some(nested) = panel["panels"].as_array() {
            found.extend(targets(nested));
        }
        if let Some(list) = panel["targets"].as_array() {
            found.extend(list);
        }
    }
    found
}

#[test]
fn every_dashboard_query_names_a_series_the_library_emits() {
    let text = read("deploy/grafana/amqp-idempotency.json");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    assert!(
        variables.iter().any(|v| v["type"] == "datasource"
            && v["name"] == "datasource"
            && v["query"] == "prometheus"),
        "a Prometheus datasource variable named `datasource`"
    );
    let panels = dashboard["panels"].as_array().expect("panels");
    let targets = targets(panels);
    assert!(targets.len() >= SERIES.len(), "{} queries", targets.len());
    let mut shown = BTreeSet::new();
    for target in targets {
        let expr = target["expr"]
            .as_str()
            .expect("every target has a PromQL expr");
        assert_eq!(
            target["datasource"]["uid"], "${datasource}",
            "`{expr}` queries the chosen datasource"
        );
        let found = names(expr);
        assert!(!found.is_empty(), "`{expr}` names no series of ours");
        assert_eq!(unknown(&found), Vec::<&str>::new(), "in `{expr}`");
        shown.extend(found.iter().map(|name| series_of(name).to_owned()));
    }
    let missing: Vec<&str> = SERIES
        .iter()
        .copied()
        .filter(|series| !shown.contains(*series))
        .collect();
    assert_eq!(missing, Vec::<&str>::new(), "series no panel shows");
}

#[test]
fn every_alert_rule_names_a_series_the_library_emits() {
    let text = read("deploy/prometheus/alerts.yml");
    let found = names(&text);
    assert_eq!(unknown(&found), Vec::<&str>::new());
    // The situations the rules exist for.
    for series in [
        "idempotency_store_paused",
        "idempotency_dead_lettered_total",
        "idempotency_lease_lost_total",
        "idempotency_outbox_undispatched_total",
        "idempotency_unreplicated_writes_total",
    ] {
        assert!(found.contains(series), "no rule on {series}");
    }
    // The rules' unit test (`promtool test rules`) feeds them real series too.
    let unit_test = names(&read("deploy/prometheus/alerts.test.yml"));
    assert_eq!(
        unknown(&unit_test),
        Vec::<&str>::new(),
        "in alerts.test.yml"
    );
    let rules = text.matches("- alert:").count();
    let summaries = text.matches("summary:").count();
    assert!(rules >= 5, "{rules} rules");
    assert_eq!(summaries, rules, "every rule says what to check");
}

#[test]
fn names_are_found_whole() {
    let found = names("rate(idempotency_store_seconds_sum[5m]) amqp-idempotency x_idempotency_no");
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        ["idempotency_store_seconds_sum"]
    );
    assert_eq!(series_of("idempotency_store_seconds_count"), STORE_SECONDS);
    assert_eq!(
        series_of("idempotency_processed_count"),
        "idempotency_processed_count",
        "only the histogram has suffixes"
    );
}
