// What the checks compare the monitoring files with, read from the repository's own code:
// - the metrics the Rust code records (`counter!`, `gauge!`, `histogram!`), the label keys it
//   gives them, and the histograms the binaries export with buckets (`Matcher::Full`), from which
//   follow the names Prometheus sees;
// - the store's tables and columns (pipeline/src/store/schema.rs);
// - the dead-letter reason classes of the ktk dashboard (dashboard/src/store.rs);
// - the Lambda's embedded-metric-format metrics and their dimension (lambda/src/emf.rs).
// A pattern that finds nothing is an error: a refactoring that moves these must update this file.

import { readFileSync, readdirSync } from "node:fs";
import { join, relative } from "node:path";

const SKIP_DIRS = new Set(["target", "node_modules", ".git", "dist", "fuzz"]);

function rustFiles(dir, out = []) {
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    if (entry.isDirectory()) {
      if (!SKIP_DIRS.has(entry.name) && !entry.name.startsWith(".")) rustFiles(join(dir, entry.name), out);
    } else if (entry.name.endsWith(".rs")) {
      out.push(join(dir, entry.name));
    }
  }
  return out;
}

function need(found, what, file) {
  if (!found || (found.size ?? found.length) === 0) {
    throw new Error(`found no ${what} in ${file}: the lint's inventory (ops/lint/inventory.mjs) needs updating`);
  }
  return found;
}

/** The block of `text` from the line that contains `start` to the next line that is `];`. */
function block(text, start, file) {
  const at = text.indexOf(start);
  if (at < 0) throw new Error(`${file} has no \`${start}\`: the lint's inventory (ops/lint/inventory.mjs) needs updating`);
  const end = text.indexOf("\n];", at);
  return text.slice(at, end < 0 ? undefined : end);
}

/**
 * The metrics of the Rust code, as a Prometheus scrape of the binaries names them.
 * metrics-exporter-prometheus writes a name as it is recorded (no `_total`, no unit suffix: the
 * binaries use the default naming); a histogram with buckets set for it is a Prometheus histogram
 * (`_bucket`, `_sum`, `_count`), any other a summary (the name with `quantile`, `_sum`, `_count`).
 */
export function rustMetrics(root) {
  const recorded = new Map(); // name -> { kind, files }
  const labels = new Set(["le", "quantile", "job", "instance"]); // the exporter's and Prometheus's own
  const bucketed = new Set();
  for (const file of rustFiles(root)) {
    const text = readFileSync(file, "utf8");
    const rel = relative(root, file);
    let any = false;
    for (const m of text.matchAll(/\b(counter|gauge|histogram)!\(\s*"([^"]+)"/g)) {
      any = true;
      const entry = recorded.get(m[2]) ?? { kinds: new Set(), files: new Set() };
      entry.kinds.add(m[1]);
      entry.files.add(rel);
      recorded.set(m[2], entry);
    }
    for (const m of text.matchAll(/Matcher::Full\(\s*"([^"]+)"/g)) bucketed.add(m[1]);
    if (any) {
      // Label keys as the call sites give them: `"key" => value` or `("key", value)`.
      for (const m of text.matchAll(/"([a-z_][a-z0-9_]*)"\s*=>/g)) labels.add(m[1]);
      for (const m of text.matchAll(/\(\s*"([a-z_][a-z0-9_]*)"\s*,/g)) labels.add(m[1]);
    }
  }
  need(recorded, "counter!/gauge!/histogram! call", root);
  const exported = new Map(); // Prometheus name -> description
  for (const [name, { kinds }] of recorded) {
    for (const kind of kinds) {
      if (kind === "histogram") {
        for (const suffix of ["_sum", "_count"]) exported.set(name + suffix, `the ${name} histogram's ${suffix.slice(1)}`);
        if (bucketed.has(name)) exported.set(`${name}_bucket`, `the buckets of the ${name} histogram`);
        else exported.set(name, `the ${name} summary (quantile label)`);
      } else {
        exported.set(name, `the ${name} ${kind}`);
      }
    }
  }
  return { recorded, exported, labels, bucketed };
}

/** The store's tables: the events table's and the dead-letter table's columns, and the suffix. */
export function storeSchema(root) {
  const file = "pipeline/src/store/schema.rs";
  const text = readFileSync(join(root, file), "utf8");
  const names = (body) => new Set([...body.matchAll(/\b(?:column|text|time)\(\s*"([a-z_][a-z0-9_]*)"/g)].map((m) => m[1]));
  const storedAt = text.match(/const STORED_AT: Column = column\(\s*"([a-z_]+)"/);
  const suffix = text.match(/const DEAD_LETTER_SUFFIX: &str = "([^"]+)"/);
  if (!storedAt || !suffix) throw new Error(`${file}: STORED_AT or DEAD_LETTER_SUFFIX not found: update ops/lint/inventory.mjs`);
  const events = need(names(block(text, "pub(crate) const EVENT_COLUMNS", file)), "events table column", file);
  const deadLetters = need(names(block(text, "pub(crate) const DEAD_LETTER_COLUMNS", file)), "dead-letter column", file);
  events.add(storedAt[1]);
  deadLetters.add(storedAt[1]);
  return { events, deadLetters, deadLetterSuffix: suffix[1], file };
}

/** The LIKE patterns of the dead-letter reason classes the ktk dashboard uses. */
export function deadLetterReasons(root) {
  const file = "dashboard/src/store.rs";
  const text = readFileSync(join(root, file), "utf8");
  const body = block(text, "pub const DEAD_LETTER_REASONS", file);
  const pairs = [...body.matchAll(/\("([a-z_]+)",\s*"([^"]*)"\)/g)].map((m) => ({ class: m[1], pattern: m[2] }));
  return { reasons: need(pairs, "dead-letter reason class", file), file };
}

/** The Lambda's EMF metrics (name -> unit) and their one dimension. */
export function emfMetrics(root) {
  const file = "lambda/src/emf.rs";
  const text = readFileSync(join(root, file), "utf8");
  const body = block(text, "let metrics: [(&str, &str, u64);", file);
  const metrics = new Map([...body.matchAll(/\(\s*"([A-Za-z]+)",\s*"([A-Za-z]+)",/g)].map((m) => [m[1], m[2]]));
  const dimension = text.match(/pub const DIMENSION: &str = "([^"]+)"/);
  if (!dimension) throw new Error(`${file}: DIMENSION not found: update ops/lint/inventory.mjs`);
  return { metrics: need(metrics, "EMF metric", file), dimension: dimension[1], file };
}
