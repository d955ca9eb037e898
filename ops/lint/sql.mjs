// SQL of Grafana's PostgreSQL data source: Grafana's macros and variables are expanded the way
// Grafana expands them (with a fixed time range), the result is parsed by the real PostgreSQL
// parser (libpg-query: PostgreSQL's own parser compiled to WebAssembly), and every table and
// column it names is looked up in the store's schema.

const FROM = "2026-01-01T00:00:00Z";
const TO = "2026-01-01T01:00:00Z";
const FROM_EPOCH = 1767225600;
const TO_EPOCH = FROM_EPOCH + 3600;

/** Grafana's interval strings ('1m', 1m, $__interval) in seconds. */
function seconds(arg) {
  const text = arg.trim().replace(/^'|'$/g, "");
  if (text === "$__interval" || text === "${__interval}") return 60;
  const m = text.match(/^(\d+)(ms|s|m|h|d)$/);
  if (!m) return null;
  return Number(m[1]) * { ms: 0.001, s: 1, m: 60, h: 3600, d: 86400 }[m[2]];
}

/** Splits a macro's arguments at top-level commas. */
function args(text) {
  const out = [];
  let depth = 0;
  let quote = false;
  let current = "";
  for (const c of text) {
    if (c === "'") quote = !quote;
    if (!quote && c === "(") depth++;
    if (!quote && c === ")") depth--;
    if (!quote && depth === 0 && c === ",") {
      out.push(current.trim());
      current = "";
    } else current += c;
  }
  if (current.trim()) out.push(current.trim());
  return out;
}

const MACROS = {
  // name: [argument count (min, max), expansion]
  time: [1, 1, ([c]) => `${c} AS "time"`],
  timeEpoch: [1, 1, ([c]) => `extract(epoch from ${c}) AS "time"`],
  timeFilter: [1, 1, ([c]) => `${c} BETWEEN '${FROM}' AND '${TO}'`],
  timeFrom: [0, 0, () => `'${FROM}'`],
  timeTo: [0, 0, () => `'${TO}'`],
  timeGroup: [2, 3, ([c, i]) => `floor(extract(epoch from ${c})/${seconds(i)})*${seconds(i)}`],
  timeGroupAlias: [2, 3, ([c, i]) => `floor(extract(epoch from ${c})/${seconds(i)})*${seconds(i)} AS "time"`],
  unixEpochFilter: [1, 1, ([c]) => `${c} >= ${FROM_EPOCH} AND ${c} <= ${TO_EPOCH}`],
  unixEpochFrom: [0, 0, () => `${FROM_EPOCH}`],
  unixEpochTo: [0, 0, () => `${TO_EPOCH}`],
  unixEpochGroup: [2, 3, ([c, i]) => `floor(${c}/${seconds(i)})*${seconds(i)}`],
  unixEpochGroupAlias: [2, 3, ([c, i]) => `floor(${c}/${seconds(i)})*${seconds(i)} AS "time"`],
};

/**
 * Expands Grafana's macros ($__timeFilter(col)...) and variables (`$name`, `${name}`) in `sql`;
 * `variables` maps a dashboard variable to the value to test with. Returns { sql, problems }.
 */
export function expandGrafana(sql, variables) {
  const problems = [];
  let text = sql.replace(/\$__(\w+)\(([^()]*(?:\([^()]*\)[^()]*)*)\)/g, (whole, name, inner) => {
    const macro = MACROS[name];
    if (!macro) {
      problems.push(`unknown Grafana macro $__${name}`);
      return "NULL";
    }
    const list = args(inner);
    if (list.length < macro[0] || list.length > macro[1]) {
      problems.push(`$__${name} takes ${macro[0]}-${macro[1]} arguments, not ${list.length}: ${whole}`);
      return "NULL";
    }
    if (/Group/.test(name) && seconds(list[1]) === null) problems.push(`$__${name}: ${list[1]} is not an interval`);
    return macro[2](list);
  });
  text = text.replace(/\$__interval_ms\b/g, "60000").replace(/\$__interval\b/g, "'1m'");
  text = text.replace(/\$\{(\w+)(?::\w+)?\}|\$(\w+)/g, (whole, braced, bare) => {
    const name = braced ?? bare;
    if (name in variables) return variables[name];
    problems.push(`unknown variable ${whole} (dashboard variables: ${Object.keys(variables).join(", ") || "none"})`);
    return "x";
  });
  return { sql: text, problems };
}

/** Calls `visit(key, node, parent)` for every object in a libpg-query AST. */
function walk(node, visit, parentKey = null) {
  if (Array.isArray(node)) {
    for (const item of node) walk(item, visit, parentKey);
  } else if (node && typeof node === "object") {
    for (const [key, value] of Object.entries(node)) {
      visit(key, value);
      walk(value, visit, key);
    }
  }
}

/**
 * Parses expanded SQL with PostgreSQL's parser and checks its tables and columns against
 * `tables` (a Map of table name -> Set of columns). Returns a list of problems.
 */
export function checkSQL(pg, sql, tables) {
  let ast;
  try {
    ast = pg.parseSync(sql);
  } catch (error) {
    const at = error.sqlDetails?.cursorPosition ?? 0;
    return [`PostgreSQL does not parse it: ${error.message} at ...${sql.slice(Math.max(0, at - 25), at)}<HERE>${sql.slice(at, at + 25)}...`];
  }
  const problems = [];
  if (ast.stmts.length !== 1) problems.push(`${ast.stmts.length} statements where one SELECT is expected`);
  if (!ast.stmts.every((s) => "SelectStmt" in s.stmt)) problems.push("not a SELECT (a dashboard only reads)");
  const used = new Map(); // alias or name -> table name, or null for a subquery
  const outputs = new Set(); // names given to output columns and subqueries
  const refs = [];
  walk(ast, (key, value) => {
    if (key === "RangeVar") {
      const name = value.schemaname ? `${value.schemaname}.${value.relname}` : value.relname;
      if (!tables.has(name) && !tables.has(value.relname)) {
        problems.push(`table ${name} is not one of the store's (${[...tables.keys()].join(", ")})`);
      }
      const table = tables.has(name) ? name : tables.has(value.relname) ? value.relname : null;
      used.set(value.relname, table);
      if (value.alias?.aliasname) used.set(value.alias.aliasname, table);
    } else if (key === "RangeSubselect" && value.alias?.aliasname) {
      used.set(value.alias.aliasname, null);
    } else if (key === "CommonTableExpr") {
      used.set(value.ctename, null);
    } else if (key === "ResTarget" && value.name) {
      outputs.add(value.name);
    } else if (key === "ColumnRef") {
      const fields = value.fields.map((f) => (f.String ? f.String.sval : "*"));
      refs.push(fields);
    }
  });
  const known = [...used.values()].filter(Boolean);
  // A table that is not the store's was reported; its columns cannot be checked.
  if (problems.length) return problems;
  for (const fields of refs) {
    const column = fields[fields.length - 1];
    if (column === "*") continue;
    if (fields.length > 1) {
      const qualifier = fields[fields.length - 2];
      if (!used.has(qualifier)) {
        problems.push(`${fields.join(".")}: no table or alias ${qualifier} in the query`);
      } else if (used.get(qualifier) && !tables.get(used.get(qualifier)).has(column)) {
        problems.push(`column ${column} is not in table ${used.get(qualifier)}`);
      }
    } else if (!outputs.has(column) && !known.some((t) => tables.get(t).has(column))) {
      problems.push(`column ${column} is in none of the tables it reads (${known.join(", ") || "none"})`);
    }
  }
  return problems;
}
