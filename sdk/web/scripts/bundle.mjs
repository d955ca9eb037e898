// Bundles the built SDK with its one runtime dependency (@bufbuild/protobuf) into
// dist/ktk-web.min.js (ESM, minified): the file a page can load as it is, the one the browser
// tests load, and the one whose size the README gives (measured there with `gzip -9`). Prints
// its size minified, and compressed by node's zlib at level 9 (within a few hundred bytes of
// `gzip -9`).
import { build } from "esbuild";
import { readFileSync } from "node:fs";
import { gzipSync } from "node:zlib";

const out = "dist/ktk-web.min.js";
await build({
  entryPoints: ["dist/index.js"],
  bundle: true,
  minify: true,
  format: "esm",
  target: "es2020",
  outfile: out,
  legalComments: "none",
  logLevel: "warning",
});
const bytes = readFileSync(out);
const gzipped = gzipSync(bytes, { level: 9 });
console.log(`${out}: ${bytes.length} bytes minified, ${gzipped.length} bytes with zlib level 9`);
