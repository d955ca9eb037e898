// Bundles src/app.js with uPlot (JavaScript and CSS) into dist/dashboard.js and
// dist/dashboard.css, minified, for the ktk-dashboard crate to embed (dashboard/build.rs).
import { build } from "esbuild";
import { statSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
await build({
  entryPoints: [join(root, "src/app.js")],
  outfile: join(root, "dist/dashboard.js"),
  bundle: true,
  minify: true,
  format: "iife",
  target: ["es2020"],
  legalComments: "eof",
  logLevel: "warning",
});
for (const file of ["dashboard.js", "dashboard.css"]) {
  console.log(`dist/${file}: ${statSync(join(root, "dist", file)).size} bytes`);
}
