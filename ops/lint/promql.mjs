// PromQL: parsed with the Prometheus project's own grammar (@prometheus-io/lezer-promql, what the
// Prometheus UI's editor uses), then every metric name and label name compared with the Rust code.

/** Grafana's interval variables, replaced by a duration before parsing. */
const GRAFANA_DURATIONS = /\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}/g;

/**
 * Parses `expr` and returns { errors, metrics, labels }: syntax errors (with the position and the
 * text around it), the metric names of its selectors and the label names it matches or groups by.
 */
export function parsePromQL(parser, expr) {
  const errors = [];
  const metrics = new Set();
  const labels = new Set();
  const text = expr.replace(GRAFANA_DURATIONS, "5m");
  if (!text.trim()) return { errors: ["empty expression"], metrics, labels };
  const tree = parser.parse(text);
  tree.iterate({
    enter(node) {
      if (node.type.isError) {
        const from = Math.max(0, node.from - 20);
        errors.push(`syntax error at character ${node.from + 1}: ...${text.slice(from, node.from)}<HERE>${text.slice(node.from, node.from + 20)}...`);
      } else if (node.name === "Identifier" && node.node.parent?.name === "VectorSelector") {
        metrics.add(text.slice(node.from, node.to));
      } else if (node.name === "LabelName") {
        labels.add(text.slice(node.from, node.to));
      } else if (node.name === "QuotedLabelName") {
        // {"name"} selectors (Prometheus 3): not used here, and not checkable by name.
        errors.push(`quoted metric or label names are not supported by this lint: ${text.slice(node.from, node.to)}`);
      }
    },
  });
  return { errors, metrics, labels };
}

/**
 * Checks one expression: it parses, every metric it selects is exported by a binary, every label
 * it names is one the code sets (or Prometheus's own). Returns a list of problems.
 */
export function checkPromQL(parser, expr, inventory) {
  const { errors, metrics, labels } = parsePromQL(parser, expr);
  const problems = [...errors];
  if (!errors.length && metrics.size === 0) problems.push("selects no metric");
  for (const name of metrics) {
    if (!inventory.exported.has(name)) problems.push(`metric ${name} is not exported by any binary (${suggest(name, inventory)})`);
  }
  for (const label of labels) {
    if (label === "__name__") problems.push("selects a metric by __name__: name it instead, so that the lint can check it");
    else if (!inventory.labels.has(label)) problems.push(`label ${label} is set on no metric of the code (known: ${[...inventory.labels].sort().join(", ")})`);
  }
  return { problems, metrics, labels };
}

function suggest(name, inventory) {
  const base = name.replace(/_(total|bucket|sum|count)$/, "");
  if (name.endsWith("_total") && inventory.exported.has(base)) return `the exporter adds no _total suffix: use ${base}`;
  if (name.endsWith("_bucket") && inventory.recorded.has(base)) {
    return `${base} has no buckets (a summary): only histograms listed with Matcher::Full in a binary have _bucket`;
  }
  const close = [...inventory.exported.keys()].filter((k) => k.toLowerCase() === name.toLowerCase() || k.toLowerCase().includes(base.toLowerCase()));
  return close.length ? `did you mean ${close.slice(0, 3).join(" or ")}?` : "see counter!/gauge!/histogram! in the Rust code";
}
