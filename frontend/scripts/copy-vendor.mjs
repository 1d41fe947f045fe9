// Copies the third-party browser assets Parley serves from npm packages into dist/
// (served as static files, as dist/parley/chat.js): Swagger UI for /api/v1/docs.
// Nothing is loaded from a CDN, so the docs work offline and under the strict CSP.

import { copyFileSync, mkdirSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const require = createRequire(import.meta.url);
const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "dist", "parley", "vendor", "swagger-ui");
const swagger = dirname(require.resolve("swagger-ui-dist/package.json"));

mkdirSync(out, { recursive: true });
for (const file of ["swagger-ui-bundle.js", "swagger-ui.css", "swagger-ui.css.map", "LICENSE", "NOTICE"]) {
  copyFileSync(join(swagger, file), join(out, file));
}
