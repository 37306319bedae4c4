//! `ops/`: the Prometheus alerting rules and the Grafana dashboard parse, their PromQL parses, and
//! every `quota_*` series they select (with its label values) is exported by a fresh service.

use promql_parser::label::MatchOp;
use promql_parser::parser::{self, Expr, VectorSelector};
use promql_parser::util::{walk_expr, ExprVisitor};
use serde_json::Value;

use crate::child::fresh_metrics_page;

const ALERTS: &str = include_str!("../../ops/prometheus-alerts.yml");
const DASHBOARD: &str = include_str!("../../ops/grafana-dashboard.json");

/// A selected series: metric name and its equality matchers.
#[derive(Debug)]
struct Selector {
    name: String,
    labels: Vec<(String, String)>,
}

#[derive(Default)]
struct Selectors(Vec<Selector>);

impl Selectors {
    fn add(&mut self, selector: &VectorSelector) {
        let labels = selector
            .matchers
            .matchers
            .iter()
            .filter(|matcher| matcher.op == MatchOp::Equal && matcher.name != "__name__")
            .map(|matcher| (matcher.name.clone(), matcher.value.clone()))
            .collect();
        if let Some(name) = &selector.name {
            self.0.push(Selector {
                name: name.clone(),
                labels,
            });
        }
    }
}

impl ExprVisitor for Selectors {
    type Error = std::convert::Infallible;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, Self::Error> {
        match expr {
            Expr::VectorSelector(selector) => self.add(selector),
            Expr::MatrixSelector(matrix) => self.add(&matrix.vs),
            _ => {}
        }
        Ok(true)
    }
}

/// Every alert of the rules file: (name, expression).
fn alert_rules() -> Vec<(String, String)> {
    let rules: Value = serde_yaml_ng::from_str(ALERTS).expect("ops/prometheus-alerts.yml is YAML");
    let mut alerts = Vec::new();
    for group in rules["groups"].as_array().expect("a list of groups") {
        for rule in group["rules"].as_array().expect("each group has rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            assert!(
                rule["labels"]["severity"].is_string(),
                "{name}: no severity"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name}: no summary"
            );
            let expr = rule["expr"].as_str().expect("every alert has an expr");
            alerts.push((name.to_string(), expr.to_string()));
        }
    }
    alerts
}

/// Every query of the dashboard's panels.
fn dashboard_queries() -> Vec<String> {
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("a list of panels") {
        let targets = panel["targets"]
            .as_array()
            .expect("every panel has targets");
        for target in targets {
            queries.push(
                target["expr"]
                    .as_str()
                    .expect("a PromQL target")
                    .to_string(),
            );
        }
    }
    queries
}

/// Whether the page exports a series of `name` carrying every one of `labels`.
fn page_exports(page: &str, selector: &Selector) -> bool {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(selector.name.as_str())
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .any(|line| {
            selector
                .labels
                .iter()
                .all(|(label, value)| line.contains(&format!("{label}=\"{value}\"")))
        })
}

#[test]
fn the_alerts_cover_what_operators_need() {
    let names: Vec<String> = alert_rules().into_iter().map(|(name, _)| name).collect();
    for needed in [
        "QuotaKeeperNotReady",
        "QuotaKeeperDeadLettersGrowing",
        "QuotaKeeperUsageBacklogGrowing",
        "QuotaKeeperCommitTimeHigh",
    ] {
        assert!(
            names.iter().any(|name| name == needed),
            "{needed} missing: {names:?}"
        );
    }
}

#[tokio::test]
async fn every_quota_series_of_the_alerts_and_dashboard_is_exported() {
    let mut expressions: Vec<String> = alert_rules().into_iter().map(|(_, expr)| expr).collect();
    expressions.extend(dashboard_queries());
    let mut selectors = Selectors::default();
    for expression in &expressions {
        let parsed = parser::parse(expression)
            .unwrap_or_else(|error| panic!("not PromQL: {expression}: {error}"));
        let Ok(_) = walk_expr(&mut selectors, &parsed);
    }
    let page = fresh_metrics_page().await;
    let mut checked = 0;
    for selector in &selectors.0 {
        if selector.name.starts_with("quota_") {
            assert!(
                page_exports(&page, selector),
                "{selector:?} is used in ops/ but not exported by a fresh service:\n{page}"
            );
            checked += 1;
        } else {
            // Only Prometheus' own `up` and RabbitMQ's exporter may be used besides ours.
            assert!(
                selector.name == "up" || selector.name.starts_with("rabbitmq_"),
                "{} comes from no known exporter",
                selector.name
            );
        }
    }
    assert!(checked >= 10, "only {checked} quota_* selectors found");
}
