// The Grafana dashboard (ops/grafana/*.json): its structure (unique panel ids, a grid without
// overlaps, data sources that resolve to the declared import inputs, variables), every PromQL
// expression (see promql.mjs) and every SQL query (see sql.mjs).

import { checkPromQL, parsePromQL } from "./promql.mjs";
import { expandGrafana, checkSQL } from "./sql.mjs";

const PANEL_TYPES = new Set(["row", "timeseries", "stat", "table", "bargauge", "gauge", "text", "heatmap", "barchart", "piechart", "alertlist"]);
/** Grafana's own variables, allowed in queries besides the dashboard's. */
const GLOBALS = new Set(["__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms", "__from", "__to", "__dashboard", "__org", "__user"]);
/** Data source types per kind of query this lint checks. */
const PROMETHEUS = new Set(["prometheus"]);
const POSTGRES = new Set(["grafana-postgresql-datasource", "postgres"]);

export function checkGrafana(file, text, ctx) {
  const problems = [];
  const fail = (where, message) => problems.push(`${file}: ${where}: ${message}`);
  let dash;
  try {
    dash = JSON.parse(text);
  } catch (error) {
    return [`${file}: not JSON: ${error.message}`];
  }
  if (typeof dash.schemaVersion !== "number" || dash.schemaVersion < 36) fail("schemaVersion", `${dash.schemaVersion} (expected a number >= 36)`);
  for (const key of ["title", "uid"]) if (typeof dash[key] !== "string" || !dash[key]) fail(key, "missing");
  if (dash.id !== null && dash.id !== undefined) fail("id", "must be null in a dashboard meant for import");

  // Import inputs: every data source is one of them.
  const inputs = new Map();
  for (const input of dash.__inputs ?? []) {
    if (input.type !== "datasource" || !input.name || !input.pluginId) fail(`__inputs ${input.name}`, "needs type datasource, a name and a pluginId");
    inputs.set(input.name, input);
  }
  if (!inputs.size) fail("__inputs", "no data source inputs: the dashboard would point at the exporting Grafana's data sources");
  const required = new Set((dash.__requires ?? []).map((r) => `${r.type}:${r.id}`));
  for (const input of inputs.values()) {
    if (!required.has(`datasource:${input.pluginId}`)) fail("__requires", `lacks the data source plugin ${input.pluginId}`);
  }
  const usedInputs = new Set();
  /** The plugin type a data source reference resolves to, or null (with a problem). */
  const resolve = (where, ref) => {
    if (ref === undefined || ref === null) return null;
    const uid = typeof ref === "string" ? ref : ref.uid;
    const m = typeof uid === "string" && uid.match(/^\$\{(\w+)\}$/);
    if (!m || !inputs.has(m[1])) {
      fail(where, `data source ${JSON.stringify(ref)} is not one of the inputs \${${[...inputs.keys()].join("}, ${")}}`);
      return null;
    }
    const input = inputs.get(m[1]);
    usedInputs.add(m[1]);
    if (typeof ref === "object" && ref.type && ref.type !== input.pluginId) {
      fail(where, `data source type ${ref.type} but input ${m[1]} is a ${input.pluginId}`);
    }
    return input.pluginId;
  };

  // Variables.
  const variables = {};
  for (const v of dash.templating?.list ?? []) {
    const where = `variable ${v.name}`;
    if (!v.name || v.name in variables) fail(where, "missing or repeated name");
    variables[v.name] = v.type === "textbox" || v.type === "constant" ? String(v.query ?? "") : "events";
    if (v.type === "query") {
      const type = resolve(where, v.datasource);
      const query = typeof v.query === "string" ? v.query : v.query?.query;
      const m = typeof query === "string" && query.match(/^label_values\((?:(.+),\s*)?(\w+)\)$/);
      if (!PROMETHEUS.has(type) || !m) {
        fail(where, `expected a Prometheus label_values(metric, label) query, got ${JSON.stringify(query)}`);
      } else {
        if (m[1]) {
          const { problems: p } = checkPromQL(ctx.promql, m[1], ctx.inventory);
          for (const x of p) fail(where, x);
        }
        if (!ctx.inventory.labels.has(m[2])) fail(where, `label ${m[2]} is set on no metric of the code`);
      }
    }
  }
  for (const [name, value] of Object.entries(ctx.sqlVariables)) if (name in variables) variables[name] = value;

  // Panels, rows' nested panels included.
  const panels = [];
  for (const panel of dash.panels ?? []) {
    panels.push(panel);
    for (const nested of panel.panels ?? []) panels.push(nested);
  }
  if (!panels.length) fail("panels", "none");
  const ids = new Map();
  const cells = new Map();
  for (const panel of panels) {
    const where = `panel ${panel.id} "${panel.title ?? ""}"`;
    if (!Number.isInteger(panel.id) || panel.id < 1) fail(where, "id must be a positive integer");
    else if (ids.has(panel.id)) fail(where, `id also used by "${ids.get(panel.id)}"`);
    else ids.set(panel.id, panel.title);
    if (!PANEL_TYPES.has(panel.type)) fail(where, `unknown panel type ${panel.type}`);
    else if (panel.type !== "row" && !required.has(`panel:${panel.type}`)) fail("__requires", `lacks the panel ${panel.type}`);
    if (!panel.title) fail(where, "no title");
    const g = panel.gridPos ?? {};
    if (![g.x, g.y, g.w, g.h].every(Number.isInteger) || g.w < 1 || g.h < 1 || g.x < 0 || g.y < 0 || g.x + g.w > 24) {
      fail(where, `gridPos ${JSON.stringify(panel.gridPos)} is not inside the 24-column grid`);
    } else {
      for (let y = g.y; y < g.y + g.h; y++) {
        for (let x = g.x; x < g.x + g.w; x++) {
          const other = cells.get(`${x},${y}`);
          if (other !== undefined) {
            fail(where, `overlaps panel ${other} at column ${x}, row ${y}`);
            y = Infinity;
            break;
          }
          cells.set(`${x},${y}`, panel.id);
        }
      }
    }
    if (panel.type === "row" || panel.type === "text") continue;
    if (panel.type !== "row" && !panel.description) fail(where, "no description (what the panel shows and why)");
    const panelType = resolve(`${where} datasource`, panel.datasource);
    const targets = panel.targets ?? [];
    if (!targets.length) fail(where, "no queries");
    const refIds = new Set();
    for (const target of targets) {
      const tw = `${where} query ${target.refId}`;
      if (!target.refId || refIds.has(target.refId)) fail(tw, "missing or repeated refId");
      refIds.add(target.refId);
      const type = target.datasource ? resolve(`${tw} datasource`, target.datasource) : panelType;
      if (PROMETHEUS.has(type)) {
        const { problems: p, labels } = checkPromQL(ctx.promql, target.expr ?? "", ctx.inventory);
        if (p.length) fail(tw, `${p.join("; ")}\n    ${target.expr}`);
        for (const m of (target.legendFormat ?? "").matchAll(/\{\{\s*(\w+)\s*\}\}/g)) {
          if (!labels.has(m[1])) fail(tw, `legend {{${m[1]}}}: the expression names no label ${m[1]}`);
        }
        checkVariables(tw, target.expr ?? "", variables, fail);
      } else if (POSTGRES.has(type)) {
        if (target.rawQuery !== true || typeof target.rawSql !== "string") {
          fail(tw, "expected a raw SQL query (rawQuery: true, rawSql)");
          continue;
        }
        const { sql, problems: p } = expandGrafana(target.rawSql, variables);
        for (const x of p) fail(tw, x);
        const sqlProblems = checkSQL(ctx.pg, sql, ctx.tables);
        if (sqlProblems.length) fail(tw, `${sqlProblems.join("; ")}\n    ${sql.replace(/\n/g, "\n    ")}`);
        for (const m of target.rawSql.matchAll(/reason LIKE '([^']*)'/g)) {
          if (!ctx.reasons.some((r) => r.pattern === m[1])) {
            fail(tw, `reason pattern '${m[1]}' is not one of the dead-letter reason classes of ${ctx.reasonsFile}`);
          }
        }
      } else if (type !== null) {
        fail(tw, `data source type ${type}: this lint checks Prometheus and PostgreSQL queries only`);
      }
    }
  }
  for (const name of inputs.keys()) if (!usedInputs.has(name)) fail("__inputs", `${name} is used by no panel`);
  return problems;
}

/** Every $variable an expression uses is the dashboard's or Grafana's own. */
function checkVariables(where, text, variables, fail) {
  for (const m of text.matchAll(/\$\{(\w+)(?::\w+)?\}|\$(\w+)/g)) {
    const name = m[1] ?? m[2];
    if (!(name in variables) && !GLOBALS.has(name)) fail(where, `unknown variable $${name}`);
  }
}

export { parsePromQL };
