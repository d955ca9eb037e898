// The CloudWatch dashboards of the CloudFormation templates (infra/*.yaml): cfn-lint
// (infra/lint.sh) checks the template, but not the JSON that a DashboardBody's Fn::Sub builds. Here
// every body is rendered for every combination of the conditions it depends on, parsed as JSON,
// and checked: widgets inside the 24-column grid without overlaps, each metric one that AWS
// publishes (a fixed list of the Kinesis, Lambda and SQS metrics used) or one that the stack
// publishes in its own namespace: the Lambda's embedded-metric-format metrics (lambda/src/emf.rs)
// and the metrics the ECS task's sidecar copies from the consumer's /metrics (its
// metric_declarations, whose names must in turn be metrics of the Rust code), each with the
// dimensions it is published with. The alarms on the stack's own namespace are checked the same way.

const AWS_METRICS = {
  "AWS/Kinesis": {
    dimensions: [["StreamName"]],
    names: [
      "GetRecords.Bytes", "GetRecords.IteratorAgeMilliseconds", "GetRecords.Latency", "GetRecords.Records",
      "GetRecords.Success", "IncomingBytes", "IncomingRecords", "PutRecord.Bytes", "PutRecord.Latency",
      "PutRecord.Success", "PutRecords.Bytes", "PutRecords.Latency", "PutRecords.Success",
      "PutRecords.TotalRecords", "PutRecords.SuccessfulRecords", "PutRecords.FailedRecords",
      "PutRecords.ThrottledRecords", "ReadProvisionedThroughputExceeded", "WriteProvisionedThroughputExceeded",
      "SubscribeToShard.RateExceeded", "SubscribeToShard.Success", "SubscribeToShardEvent.Bytes",
      "SubscribeToShardEvent.MillisBehindLatest", "SubscribeToShardEvent.Records", "SubscribeToShardEvent.Success",
    ],
  },
  "AWS/Lambda": {
    dimensions: [["FunctionName"]],
    names: ["Invocations", "Errors", "Throttles", "Duration", "IteratorAge", "ConcurrentExecutions", "DestinationDeliveryFailures"],
  },
  "AWS/SQS": {
    dimensions: [["QueueName"]],
    names: ["ApproximateNumberOfMessagesVisible", "ApproximateAgeOfOldestMessage", "NumberOfMessagesSent"],
  },
};
const WIDGET_TYPES = new Set(["metric", "text", "alarm", "log", "explorer"]);
const NO_VALUE = Symbol("AWS::NoValue");

/** CloudFormation's short-form tags for the `yaml` package. */
export function cfnTags() {
  const names = ["Ref", "Sub", "GetAtt", "If", "Equals", "Not", "And", "Or", "Join", "Select", "Split", "ImportValue",
    "FindInMap", "Base64", "Condition", "GetAZs", "Cidr"];
  const tags = [];
  for (const name of names) {
    const key = name === "Ref" || name === "Condition" ? name : `Fn::${name}`;
    for (const collection of [undefined, "seq", "map"]) {
      const tag = {
        tag: `!${name}`,
        resolve(value) {
          let v = value && typeof value.toJSON === "function" ? value.toJSON() : value;
          if (name === "GetAtt" && typeof v === "string") v = v.split(".");
          return { [key]: v };
        },
      };
      if (collection) tag.collection = collection;
      tags.push(tag);
    }
  }
  return tags;
}

/** Renders a template value to a string for one assignment of conditions. */
function render(value, template, conditions, where) {
  const params = template.Parameters ?? {};
  const resources = template.Resources ?? {};
  const ref = (name) => {
    if (name === "AWS::NoValue") return NO_VALUE;
    if (name === "AWS::Region") return "eu-west-1";
    if (name === "AWS::StackName") return "ktk-compute";
    if (name === "AWS::AccountId") return "123456789012";
    if (name === "AWS::Partition") return "aws";
    if (name === "AWS::URLSuffix") return "amazonaws.com";
    if (name in params) return params[name].Type === "Number" ? String(params[name].Default ?? 1) : `param:${name}`;
    if (name in resources) return `ref:${name}`;
    throw new Error(`${where}: Ref to ${name}, which is no parameter or resource`);
  };
  const go = (v) => {
    if (typeof v === "string" || typeof v === "number" || typeof v === "boolean") return String(v);
    if (v === null || typeof v !== "object" || Array.isArray(v)) throw new Error(`${where}: ${JSON.stringify(v)} is not a string`);
    const [fn, arg] = Object.entries(v)[0];
    switch (fn) {
      case "Ref":
        return ref(arg);
      case "Fn::If": {
        if (!(arg[0] in conditions)) throw new Error(`${where}: Fn::If on ${arg[0]}, which is no condition`);
        return go(conditions[arg[0]] ? arg[1] : arg[2]);
      }
      case "Fn::ImportValue":
        return `import:${go(arg)}`;
      case "Fn::GetAtt": {
        const [resource, attribute] = Array.isArray(arg) ? arg : arg.split(".");
        if (!(resource in resources)) throw new Error(`${where}: Fn::GetAtt of ${resource}, which is no resource`);
        return `getatt:${resource}.${attribute}`;
      }
      case "Fn::Join":
        return arg[1].map(go).filter((x) => x !== NO_VALUE).join(arg[0]);
      case "Fn::Sub": {
        const [text, vars] = typeof arg === "string" ? [arg, {}] : arg;
        return text.replace(/\$\{([^}]+)\}/g, (whole, name) => {
          if (name.startsWith("!")) return `\${${name.slice(1)}}`;
          if (name in vars) return go(vars[name]);
          if (name.includes(".") && !name.startsWith("AWS::")) return go({ "Fn::GetAtt": name.split(".") });
          return ref(name);
        });
      }
      default:
        throw new Error(`${where}: ${fn} is not rendered by this lint`);
    }
  };
  return go(value);
}

/** The condition names an Fn::If anywhere in `value` depends on. */
function ifConditions(value, out = new Set()) {
  if (Array.isArray(value)) value.forEach((v) => ifConditions(v, out));
  else if (value && typeof value === "object") {
    for (const [k, v] of Object.entries(value)) {
      if (k === "Fn::If") out.add(v[0]);
      ifConditions(v, out);
    }
  }
  return out;
}

function* assignments(names) {
  const list = [...names];
  for (let bits = 0; bits < 1 << list.length; bits++) {
    yield Object.fromEntries(list.map((n, i) => [n, Boolean(bits & (1 << i))]));
  }
}

/**
 * What the stack publishes in its own namespace: metric name -> list of dimension sets. From the
 * Lambda's EMF metrics and the sidecar's metric_declarations (found in the template's environment
 * variable AOT_CONFIG_CONTENT).
 */
function ownMetrics(template, ctx, fail) {
  const own = new Map();
  for (const name of ctx.emf.metrics.keys()) own.set(name, [[ctx.emf.dimension]]);
  for (const [id, resource] of Object.entries(template.Resources ?? {})) {
    if (resource.Type !== "AWS::ECS::TaskDefinition") continue;
    const text = JSON.stringify(resource.Properties ?? {});
    if (!text.includes("AOT_CONFIG_CONTENT")) continue;
    for (const container of resource.Properties.ContainerDefinitions ?? []) {
      const candidates = container["Fn::If"] ? [container["Fn::If"][1]] : [container];
      for (const c of candidates) {
        const env = (c.Environment ?? []).find((e) => e.Name === "AOT_CONFIG_CONTENT");
        if (!env) continue;
        const where = `${id} ${c.Name} AOT_CONFIG_CONTENT`;
        let config;
        try {
          const conditions = Object.fromEntries(Object.keys(template.Conditions ?? {}).map((k) => [k, true]));
          config = ctx.YAML.parse(render(env.Value, template, conditions, where));
        } catch (error) {
          fail(where, `not YAML: ${error.message}`);
          continue;
        }
        const declarations = config?.exporters?.awsemf?.metric_declarations ?? [];
        if (!declarations.length) fail(where, "no exporters.awsemf.metric_declarations");
        for (const d of declarations) {
          for (const name of d.metric_name_selectors ?? []) {
            const recorded = ctx.inventory.recorded.get(name);
            if (!recorded) fail(where, `selects ${name}, which the Rust code does not record`);
            else {
              for (const dims of d.dimensions ?? []) {
                for (const dim of dims) {
                  if (!ctx.inventory.labels.has(dim)) fail(where, `${name}: dimension ${dim} is set on no metric of the code`);
                }
              }
            }
            own.set(name, [...(own.get(name) ?? []), ...(d.dimensions ?? [])]);
          }
        }
      }
    }
  }
  return own;
}

const same = (a, b) => a.length === b.length && [...a].sort().join() === [...b].sort().join();

/** Checks one metric (namespace, name, dimension names) against what is published. */
function checkMetric(where, namespace, name, dims, own, fail) {
  if (namespace.startsWith("param:")) {
    const sets = own.get(name);
    if (!sets) fail(where, `${name} is not published in the stack's namespace (EMF: lambda/src/emf.rs; ECS: the sidecar's metric_declarations)`);
    else if (!sets.some((s) => same(s, dims))) fail(where, `${name} is published with dimensions ${sets.map((s) => `[${s}]`).join(" or ")}, not [${dims}]`);
  } else if (AWS_METRICS[namespace]) {
    const known = AWS_METRICS[namespace];
    if (!known.names.includes(name)) fail(where, `${namespace} ${name} is not in the lint's list of ${namespace} metrics`);
    else if (!known.dimensions.some((s) => same(s, dims))) fail(where, `${namespace} ${name} with dimensions [${dims}]`);
  } else {
    fail(where, `namespace ${namespace} is neither AWS's (${Object.keys(AWS_METRICS).join(", ")}) nor the stack's own`);
  }
}

function checkBody(where, body, own, fail) {
  let dash;
  try {
    dash = JSON.parse(body);
  } catch (error) {
    const at = Number(error.message.match(/position (\d+)/)?.[1] ?? 0);
    fail(where, `DashboardBody is not JSON: ${error.message}: ...${body.slice(Math.max(0, at - 60), at)}<HERE>${body.slice(at, at + 30)}...`);
    return;
  }
  const widgets = dash.widgets;
  if (!Array.isArray(widgets) || !widgets.length) return fail(where, "no widgets");
  const cells = new Map();
  widgets.forEach((w, i) => {
    const ww = `${where} widget ${i + 1} "${w.properties?.title ?? w.type}"`;
    if (!WIDGET_TYPES.has(w.type)) fail(ww, `unknown type ${w.type}`);
    const { x, y, width, height } = w;
    if (![x, y, width, height].every(Number.isInteger) || x < 0 || y < 0 || width < 1 || height < 1 || x + width > 24) {
      fail(ww, `position x ${x}, y ${y}, width ${width}, height ${height} is not inside the 24-column grid`);
    } else {
      outer: for (let r = y; r < y + height; r++) {
        for (let c = x; c < x + width; c++) {
          if (cells.has(`${c},${r}`)) {
            fail(ww, `overlaps widget ${cells.get(`${c},${r}`)}`);
            break outer;
          }
          cells.set(`${c},${r}`, i + 1);
        }
      }
    }
    const p = w.properties ?? {};
    if (w.type === "text" && !p.markdown) fail(ww, "a text widget without markdown");
    if (w.type === "alarm" && (!Array.isArray(p.alarms) || !p.alarms.length || !p.alarms.every((a) => a.startsWith("getatt:") && a.endsWith(".Arn")))) {
      fail(ww, `alarms must be alarm ARNs of this stack (\${Alarm.Arn}): ${JSON.stringify(p.alarms)}`);
    }
    if (w.type !== "metric") return;
    if (!p.title) fail(ww, "no title");
    if (!p.region) fail(ww, "no region");
    if (!Array.isArray(p.metrics) || !p.metrics.length) return fail(ww, "no metrics");
    let previous = [];
    for (const row of p.metrics) {
      if (!Array.isArray(row)) {
        fail(ww, `metric ${JSON.stringify(row)} is not an array`);
        continue;
      }
      const options = typeof row[row.length - 1] === "object" ? row[row.length - 1] : null;
      if (options?.expression) {
        previous = [];
        continue;
      }
      const parts = (options ? row.slice(0, -1) : row).map((v, i) => (v === "." ? previous[i] : v));
      previous = parts;
      if (parts.length < 2 || parts.length % 2 !== 0 || parts.some((v) => typeof v !== "string")) {
        fail(ww, `metric ${JSON.stringify(row)}: [namespace, name, dimension, value, ...] expected`);
        continue;
      }
      const [namespace, name, ...dimPairs] = parts;
      const dims = dimPairs.filter((_, i) => i % 2 === 0);
      checkMetric(ww, namespace, name, dims, own, fail);
    }
  });
}

export function checkTemplate(file, text, ctx) {
  const problems = [];
  const fail = (where, message) => problems.push(`${file}: ${where}: ${message}`);
  const doc = ctx.YAML.parseDocument(text, { customTags: cfnTags() });
  if (doc.errors.length) return [`${file}: not YAML: ${doc.errors[0].message}`];
  const template = doc.toJS();
  const own = ownMetrics(template, ctx, fail);
  let dashboards = 0;
  for (const [id, resource] of Object.entries(template.Resources ?? {})) {
    const props = resource.Properties ?? {};
    if (resource.Type === "AWS::CloudWatch::Dashboard") {
      dashboards++;
      const names = ifConditions(props.DashboardBody);
      for (const name of names) if (!(name in (template.Conditions ?? {}))) fail(id, `Fn::If on an unknown condition ${name}`);
      for (const assignment of assignments(names)) {
        const label = Object.entries(assignment).map(([k, v]) => `${k}=${v}`).join(", ") || "always";
        try {
          checkBody(`${id} (${label})`, render(props.DashboardBody, template, assignment, id), own, fail);
        } catch (error) {
          fail(id, error.message);
        }
      }
    } else if (resource.Type === "AWS::CloudWatch::Alarm" && props.Namespace?.Ref) {
      const dims = (props.Dimensions ?? []).map((d) => d.Name);
      checkMetric(id, `param:${props.Namespace.Ref}`, props.MetricName, dims, own, fail);
    }
  }
  return { problems, dashboards };
}
