// ops/lint.sh's checks that need parsers: the Grafana dashboards (ops/grafana/*.json), the
// Prometheus rules and their tests (ops/prometheus/*.yml), and the CloudWatch dashboards of the
// CloudFormation templates (infra/*.yaml), each against the repository's own code (inventory.mjs).
//
//   node ops/lint/check.mjs ROOT NODE_MODULES [FILE...]
//
// ROOT is the repository; NODE_MODULES the folder where `npm ci` installed ops/package-lock.json
// (ops/lint.sh keeps it in a cache outside the clone). FILEs (default: all of the above) are
// checked by their kind: .json Grafana, .yml Prometheus rules (with FILE's .test.yml beside it) or
// promtool tests, .yaml CloudFormation. Prints one line per file checked, every problem found,
// and exits 1 when there is any.

import { readFileSync, readdirSync, existsSync } from "node:fs";
import { createRequire } from "node:module";
import { basename, join, relative, resolve } from "node:path";

import { rustMetrics, storeSchema, deadLetterReasons, emfMetrics } from "./inventory.mjs";
import { checkGrafana } from "./grafana.mjs";
import { checkRules, checkRuleTests } from "./rules.mjs";
import { checkTemplate } from "./cloudformation.mjs";

const [root, modules, ...only] = process.argv.slice(2);
if (!root || !modules) {
  console.error("usage: node ops/lint/check.mjs ROOT NODE_MODULES [FILE...]");
  process.exit(2);
}
const require = createRequire(join(resolve(modules), "..", "package.json"));
const YAML = require("yaml");
const { parser: promql } = require("@prometheus-io/lezer-promql");
const pg = require("libpg-query");
await pg.loadModule();

const list = (dir, test) => (existsSync(join(root, dir)) ? readdirSync(join(root, dir)).filter(test).map((f) => join(root, dir, f)) : []);
const files = only.length
  ? only.map((f) => resolve(f))
  : [
      ...list("ops/grafana", (f) => f.endsWith(".json")),
      ...list("ops/prometheus", (f) => f.endsWith(".yml") && !f.endsWith(".test.yml")),
      ...list("infra", (f) => f.endsWith(".yaml")),
    ];

const inventory = rustMetrics(root);
const schema = storeSchema(root);
const { reasons, file: reasonsFile } = deadLetterReasons(root);
const sqlVariables = { table: "events" };
const tables = new Map([
  [sqlVariables.table, schema.events],
  [sqlVariables.table + schema.deadLetterSuffix, schema.deadLetters],
]);
const ctx = { YAML, promql, pg, inventory, tables, sqlVariables, reasons, reasonsFile, emf: emfMetrics(root) };

const problems = [];
let dashboards = 0;
for (const file of files) {
  const rel = relative(root, file);
  const text = readFileSync(file, "utf8");
  const before = problems.length;
  let what;
  if (file.endsWith(".json")) {
    problems.push(...checkGrafana(rel, text, ctx));
    let count = "?";
    try {
      count = (JSON.parse(text).panels ?? []).flatMap((p) => [p, ...(p.panels ?? [])]).filter((p) => p.type !== "row").length;
    } catch {
      // reported by checkGrafana
    }
    what = `Grafana dashboard, ${count} panels`;
  } else if (file.endsWith(".test.yml")) {
    const rules = file.replace(/\.test\.yml$/, ".yml");
    const { alerts } = checkRules(relative(root, rules), YAML.parse(readFileSync(rules, "utf8")), ctx);
    problems.push(...checkRuleTests(rel, YAML.parse(text), alerts, ctx));
    what = `promtool tests of ${alerts.size} alerts`;
  } else if (file.endsWith(".yml")) {
    const { problems: p, alerts } = checkRules(rel, YAML.parse(text), ctx);
    problems.push(...p);
    const tests = file.replace(/\.yml$/, ".test.yml");
    if (existsSync(tests)) {
      problems.push(...checkRuleTests(relative(root, tests), YAML.parse(readFileSync(tests, "utf8")), alerts, ctx));
    } else {
      problems.push(`${rel}: no unit tests beside it (${basename(tests)})`);
    }
    what = `Prometheus rules, ${alerts.size} alerts, and ${basename(tests)}`;
  } else if (file.endsWith(".yaml")) {
    const { problems: p, dashboards: n } = checkTemplate(rel, text, ctx);
    problems.push(...p);
    dashboards += n;
    what = `CloudFormation template, ${n} dashboard(s)`;
  } else {
    problems.push(`${rel}: not a kind this lint knows (.json, .yml, .test.yml, .yaml)`);
    continue;
  }
  console.log(`${problems.length === before ? "ok  " : "FAIL"} ${rel}: ${what}`);
}
if (!only.length && dashboards === 0) problems.push("infra/*.yaml: no AWS::CloudWatch::Dashboard in any template");

if (problems.length) {
  console.error(`\n${problems.length} problem(s):`);
  for (const p of problems) console.error(`- ${p}`);
  process.exit(1);
}
console.log(
  `checked against ${inventory.exported.size} exported metric names (${inventory.recorded.size} recorded in the Rust code), ` +
    `${schema.events.size} + ${schema.deadLetters.size} store columns (${schema.file}), ${ctx.emf.metrics.size} EMF metrics (${ctx.emf.file})`,
);
