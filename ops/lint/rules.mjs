// The Prometheus alerting rules (ops/prometheus/*.yml) and their promtool unit tests
// (*.test.yml): what promtool does not check. Every rule's metrics and labels exist in the code;
// every alert has a `for`, a severity and a summary and description whose $labels its expression
// can give; every alert has a test that makes it fire, and one test asserts that healthy series
// fire none of them.

import { checkPromQL } from "./promql.mjs";

const SEVERITIES = new Set(["critical", "warning", "info"]);

export function checkRules(file, doc, ctx) {
  const problems = [];
  const fail = (where, message) => problems.push(`${file}: ${where}: ${message}`);
  const alerts = new Set();
  if (!Array.isArray(doc?.groups) || !doc.groups.length) return { problems: [`${file}: no rule groups`], alerts };
  for (const group of doc.groups) {
    for (const rule of group.rules ?? []) {
      const name = rule.alert ?? rule.record;
      const where = `${group.name}/${name}`;
      const { problems: p, labels } = checkPromQL(ctx.promql, String(rule.expr ?? ""), ctx.inventory);
      for (const x of p) fail(where, x);
      if (!rule.alert) continue;
      if (alerts.has(rule.alert)) fail(where, "alert name used twice");
      alerts.add(rule.alert);
      if (!/^\d+[smh]$/.test(String(rule.for ?? ""))) fail(where, `for: ${rule.for} (a duration such as 5m is expected: no alert fires on one evaluation)`);
      if (!SEVERITIES.has(rule.labels?.severity)) fail(where, `labels.severity ${rule.labels?.severity} is not one of ${[...SEVERITIES].join(", ")}`);
      for (const key of ["summary", "description"]) {
        const text = rule.annotations?.[key];
        if (typeof text !== "string" || !text.trim()) {
          fail(where, `no ${key} annotation`);
          continue;
        }
        for (const m of text.matchAll(/\$labels\.(\w+)/g)) {
          if (!labels.has(m[1])) fail(where, `${key} uses $labels.${m[1]}, which the expression does not name`);
        }
      }
    }
  }
  return { problems, alerts };
}

export function checkRuleTests(file, doc, alerts, ctx) {
  const problems = [];
  const fail = (where, message) => problems.push(`${file}: ${where}: ${message}`);
  const fired = new Set();
  let healthy = false;
  for (const test of doc?.tests ?? []) {
    const where = `test "${test.name ?? "?"}"`;
    for (const input of test.input_series ?? []) {
      const name = String(input.series ?? "").match(/^([A-Za-z_:][A-Za-z0-9_:]*)/)?.[1];
      if (!name || !ctx.inventory.exported.has(name)) fail(where, `input series ${input.series}: no binary exports ${name}`);
    }
    const quiet = new Set();
    for (const check of test.alert_rule_test ?? []) {
      if (!alerts.has(check.alertname)) fail(where, `tests ${check.alertname}, which no rule defines`);
      if ((check.exp_alerts ?? []).length) fired.add(check.alertname);
      else quiet.add(check.alertname);
    }
    if (alerts.size && [...alerts].every((a) => quiet.has(a))) healthy = true;
  }
  for (const alert of alerts) if (!fired.has(alert)) fail("tests", `no test makes ${alert} fire`);
  if (!healthy) fail("tests", "no test asserts that healthy series fire no alert (one test with exp_alerts: [] for every alert)");
  return problems;
}
