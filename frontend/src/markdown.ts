// An assistant's answer as Markdown (CommonMark with GFM tables and strikethrough),
// rendered into the page safely. The model's output is untrusted: raw HTML in it is
// shown as text (markdown-it's `html: false`), links go only to http(s), mailto or this
// site, images load only from this site (any other becomes a link to it), and the HTML
// markdown-it makes passes DOMPurify with a short list of tags and attributes before it
// becomes DOM. Code blocks show their language, a Copy button, and highlighting
// (highlight.js core with the few languages registered below, to keep the bundle small).
//
// While an answer streams, `StreamingMarkdown` renders at most once per animation frame,
// less often when rendering gets slow (it keeps itself under a fifth of the main
// thread), and replaces only the top-level blocks that changed, so what was rendered
// already stays put (a selection in it survives, a same-site image is not fetched again).

import DOMPurify from "dompurify";
import hljs from "highlight.js/lib/core";
import bash from "highlight.js/lib/languages/bash";
import c from "highlight.js/lib/languages/c";
import cpp from "highlight.js/lib/languages/cpp";
import css from "highlight.js/lib/languages/css";
import diff from "highlight.js/lib/languages/diff";
import go from "highlight.js/lib/languages/go";
import java from "highlight.js/lib/languages/java";
import javascript from "highlight.js/lib/languages/javascript";
import json from "highlight.js/lib/languages/json";
import python from "highlight.js/lib/languages/python";
import rust from "highlight.js/lib/languages/rust";
import sql from "highlight.js/lib/languages/sql";
import typescript from "highlight.js/lib/languages/typescript";
import xml from "highlight.js/lib/languages/xml";
import yaml from "highlight.js/lib/languages/yaml";
import MarkdownIt from "markdown-it";
import { el } from "./dom";

const LANGUAGES = { bash, c, cpp, css, diff, go, java, javascript, json, python, rust, sql, typescript, xml, yaml };
for (const [name, language] of Object.entries(LANGUAGES)) hljs.registerLanguage(name, language);

// What the sanitiser lets through: what markdown-it and highlight.js produce, no more.
const ALLOWED_TAGS = [
  "a", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "img", "li",
  "ol", "p", "pre", "s", "span", "strong", "table", "tbody", "td", "th", "thead", "tr", "ul",
];
const ALLOWED_ATTR = ["href", "src", "alt", "title", "class", "start"];
const LINK_SCHEMES = new Set(["http:", "https:", "mailto:"]);
const LINK_REL = "noopener noreferrer nofollow";

// A URL the page may link to: http(s), mailto, or a path on this site. `javascript:`,
// `data:`, `vbscript:`, `file:` and the like never.
export function safeLink(url: string): boolean {
  try {
    const parsed = new URL(url, window.location.href);
    return LINK_SCHEMES.has(parsed.protocol);
  } catch {
    return false;
  }
}

// An image the page may load: one from this site only (no tracking pixel, no request
// anywhere else; the CSP's img-src says the same).
export function sameOriginImage(url: string): boolean {
  try {
    const parsed = new URL(url, window.location.href);
    return (parsed.protocol === "http:" || parsed.protocol === "https:") && parsed.origin === window.location.origin;
  } catch {
    return false;
  }
}

function highlighted(code: string, language: string): string {
  if (!language || !hljs.getLanguage(language)) return ""; // markdown-it escapes it
  try {
    return hljs.highlight(code, { language, ignoreIllegals: true }).value;
  } catch {
    return "";
  }
}

const md = new MarkdownIt("default", { html: false, linkify: true, typographer: false, highlight: highlighted });
md.validateLink = safeLink;

// A remote image becomes a link to it (its alternative text, or the URL, as the label).
md.renderer.rules.image = (tokens, idx, options, env, self) => {
  const token = tokens[idx];
  const src = String(token.attrGet("src") ?? "");
  const alt = self.renderInlineAsText(token.children ?? [], options, env);
  if (sameOriginImage(src)) {
    token.attrSet("alt", alt);
    return self.renderToken(tokens, idx, options);
  }
  const label = md.utils.escapeHtml(alt || src);
  return `<a href="${md.utils.escapeHtml(src)}" class="remote-image">${label}</a>`;
};

// Table alignment as a class: the CSP allows no inline style.
md.core.ruler.push("align_classes", (state) => {
  for (const token of state.tokens) {
    if (token.type !== "th_open" && token.type !== "td_open") continue;
    const align = /text-align:(left|right|center)/.exec(String(token.attrGet("style") ?? ""))?.[1];
    token.attrs = align ? [["class", `align-${align}`]] : null;
  }
});

// Defence in depth: whatever gets to the sanitiser, links and images obey the same rules.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    const href = node.getAttribute("href");
    if (href !== null && !safeLink(href)) node.removeAttribute("href");
    node.setAttribute("rel", LINK_REL);
    node.setAttribute("target", "_blank");
  } else if (node.tagName === "IMG") {
    const src = node.getAttribute("src");
    // Without its source it loads nothing (removing the node here would upset the walk).
    if (src === null || !sameOriginImage(src)) node.removeAttribute("src");
    else node.setAttribute("loading", "lazy");
  }
});

function sanitized(html: string): DocumentFragment {
  return DOMPurify.sanitize(html, {
    ALLOWED_TAGS,
    ALLOWED_ATTR,
    ALLOW_DATA_ATTR: false,
    ALLOW_ARIA_ATTR: false,
    RETURN_DOM_FRAGMENT: true,
  });
}

// The Markdown as a list of top-level nodes (blank text between blocks dropped), code
// blocks with their label and Copy button.
export function markdownNodes(source: string): Node[] {
  const fragment = sanitized(md.render(source));
  for (const pre of Array.from(fragment.querySelectorAll("pre"))) decorateCode(pre);
  return Array.from(fragment.childNodes).filter((n) => n.nodeType !== Node.TEXT_NODE || n.textContent?.trim());
}

// Renders the Markdown into the element, replacing its content.
export function renderMarkdown(target: HTMLElement, source: string): void {
  const nodes = markdownNodes(source);
  target.classList.add("markdown");
  const old = Array.from(target.childNodes);
  // Blocks rendered the same stay (the streaming case: all but the last usually do).
  let same = 0;
  while (same < old.length && same < nodes.length && old[same].isEqualNode(nodes[same])) same++;
  for (const node of old.slice(same)) node.remove();
  target.append(...nodes.slice(same));
}

function decorateCode(pre: HTMLPreElement): void {
  const code = pre.querySelector("code");
  if (!code) return;
  const language = /(?:^|\s)language-(\S+)/.exec(code.className)?.[1] ?? "";
  if (hljs.getLanguage(language)) code.classList.add("hljs");
  const head = el("div", { class: "code-head" });
  head.append(el("span", { class: "code-language" }, language || "text"));
  const copy = el("button", { type: "button", class: "copy", "aria-label": "Copy the code" }, "Copy");
  head.append(copy);
  const block = el("div", { class: "code-block" });
  pre.replaceWith(block);
  block.append(head, pre);
}

// The Copy buttons of rendered answers, by delegation (rendered blocks are replaced as
// an answer streams). Listens on the element that holds the answers.
export function handleCopyClicks(root: HTMLElement): void {
  root.addEventListener("click", (event) => {
    const button = (event.target as HTMLElement).closest<HTMLButtonElement>(".code-block button.copy");
    const code = button?.closest(".code-block")?.querySelector("pre code");
    if (!button || !code) return;
    void copyText(code.textContent ?? "").then((ok) => {
      button.textContent = ok ? "Copied" : "Copy failed";
      window.setTimeout(() => {
        button.textContent = "Copy";
      }, 1500);
    });
  });
}

async function copyText(text: string): Promise<boolean> {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // No clipboard API (an insecure context) or no permission: the older way.
    const area = el("textarea", { class: "visually-hidden", readonly: "" });
    area.value = text;
    document.body.append(area);
    area.select();
    try {
      return document.execCommand("copy");
    } catch {
      return false;
    } finally {
      area.remove();
    }
  }
}

// Slowest share of the main thread the streaming render may take.
const BUSY_SHARE = 0.2;

// An answer's text as it streams in, rendered into one element: at most once per
// animation frame, and never more than BUSY_SHARE of the time (a long answer renders
// less often rather than slowing the page).
export class StreamingMarkdown {
  private source = "";
  private frame: number | null = null;
  private notBefore = 0;

  constructor(readonly element: HTMLElement) {
    element.classList.add("markdown");
  }

  get text(): string {
    return this.source;
  }

  append(delta: string): void {
    this.source += delta;
    this.schedule();
  }

  // Render now (the answer ended, or is replaced).
  flush(): void {
    if (this.frame !== null) cancelAnimationFrame(this.frame);
    this.frame = null;
    this.render();
  }

  private schedule(): void {
    if (this.frame !== null) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = null;
      if (performance.now() < this.notBefore) this.schedule();
      else this.render();
    });
  }

  private render(): void {
    const start = performance.now();
    renderMarkdown(this.element, this.source);
    const took = performance.now() - start;
    this.notBefore = start + took / BUSY_SHARE;
  }
}
