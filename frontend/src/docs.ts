// The API docs page (/api/v1/docs): Swagger UI, served by Parley from the npm package
// swagger-ui-dist (scripts/copy-vendor.mjs), started here rather than by an inline
// script, which the page's Content Security Policy forbids.

import { required } from "./dom";

interface SwaggerRequest {
  url: string;
  method?: string;
  headers: Record<string, string>;
}

declare global {
  interface Window {
    SwaggerUIBundle?: (options: Record<string, unknown>) => unknown;
  }
}

const page = document.body.dataset;
const settings = JSON.parse(required<HTMLScriptElement>("#swagger-settings").textContent ?? "{}") as Record<
  string,
  unknown
>;
const start = window.SwaggerUIBundle;
if (!start) throw new Error("Swagger UI did not load");

start({
  ...settings,
  dom_id: "#swagger-ui",
  // "Try it out" with the member's session: the API wants the CSRF token on writes.
  requestInterceptor(request: SwaggerRequest) {
    const safe = ["GET", "HEAD", "OPTIONS"].includes((request.method ?? "GET").toUpperCase());
    if (page.csrfToken && !safe && new URL(request.url, location.href).origin === location.origin) {
      request.headers["X-CSRFToken"] = page.csrfToken;
    }
    return request;
  },
});
