// An assistant's answer as Markdown (CommonMark with GFM tables and strikethrough),
// rendered into the page safely. The model's output is untrusted: raw HTML in it is
// shown as text (markdown-it's `html: false`), links go only to http(s), mailto or this
// site, images load only from this site (any other becomes a link to it), and the HTML
// markdown-it makes passes DOMPurify with a short list of tags and attributes before it
// becomes DOM. Code blocks show their language, a Copy button, and highlighting
// (highlight.js core with the few languages registered below, to keep the bundle small).
// Math (`$…$`, `$$…$$`, a `$$` block) is kept as its TeX until ./math, loaded the first
// time an answer holds some, typesets it.
//
// While an answer streams, `StreamingMarkdown` renders at most once per animation frame,
// less often when rendering gets slow (it keeps itself under a fifth of the main
// thread); it parses only the text after the last finished block (a blank line outside
// code or math), and replaces only the top-level blocks that changed, so what was
// rendered stays put (a selection in it survives, a same-site image is not fetched
// again). At the end the whole text is rendered once more, as a stored answer is.

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
import type { StateBlock, StateInline } from "markdown-it";
import { el } from "./dom";

const LANGUAGES = { bash, c, cpp, css, diff, go, java, javascript, json, python, rust, sql, typescript, xml, yaml };
for (const [name, language] of Object.entries(LANGUAGES)) hljs.registerLanguage(name, language);

// What the sanitiser lets through: what markdown-it and highlight.js produce, no more.
const ALLOWED_TAGS = [
  "a", "div", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "img", "li",
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

// --- math: found by markdown-it, typeset by ./math when it is loaded ------------------

// `$…$` (no space inside the dollars, no digit after: "$5 and $6" is money) or `$$…$$`.
function mathInline(state: StateInline, silent: boolean): boolean {
  const src = state.src;
  const start = state.pos;
  if (src.charCodeAt(start) !== 0x24) return false;
  const display = src.charCodeAt(start + 1) === 0x24;
  const marker = display ? "$$" : "$";
  const first = src.charAt(start + marker.length);
  if (!first || /\s/.test(first)) return false;
  let end = start + marker.length;
  for (;;) {
    end = src.indexOf(marker, end);
    if (end === -1 || end > state.posMax) return false;
    if (src.charCodeAt(end - 1) !== 0x5c) break; // an escaped dollar is TeX's
    end += 1;
  }
  if (end === start + marker.length || /\s/.test(src.charAt(end - 1))) return false;
  if (!display && /\d/.test(src.charAt(end + 1))) return false;
  if (!silent) {
    const token = state.push("math_inline", "", 0);
    token.content = src.slice(start + marker.length, end);
    token.markup = marker;
  }
  state.pos = end + marker.length;
  return true;
}

// A block from a line starting with `$$` to one ending with it. Unclosed (still
// streaming), it is no block: shown as text until the closing line comes.
function mathBlock(state: StateBlock, startLine: number, endLine: number, silent: boolean): boolean {
  if (state.sCount[startLine] - state.blkIndent >= 4) return false;
  const line = (n: number) => state.src.slice(state.bMarks[n] + state.tShift[n], state.eMarks[n]).trimEnd();
  const opening = line(startLine);
  if (!opening.startsWith("$$")) return false;
  const lines: string[] = [];
  let last = startLine;
  const rest = opening.slice(2);
  if (rest.length >= 2 && rest.endsWith("$$")) lines.push(rest.slice(0, -2));
  else {
    lines.push(rest);
    for (last = startLine + 1; ; last++) {
      if (last >= endLine) return false;
      const text = line(last);
      if (text.endsWith("$$")) {
        lines.push(text.slice(0, -2));
        break;
      }
      lines.push(text);
    }
  }
  if (silent) return true;
  state.line = last + 1;
  const token = state.push("math_block", "div", 0);
  token.block = true;
  token.content = lines.join("\n").trim();
  token.map = [startLine, state.line];
  return true;
}

md.inline.ruler.after("escape", "math_inline", mathInline);
md.block.ruler.before("fence", "math_block", mathBlock, { alt: ["paragraph", "reference", "blockquote", "list"] });
md.renderer.rules.math_inline = (tokens, idx) => {
  const kind = tokens[idx].markup === "$$" ? "math-display" : "math-inline";
  return `<span class="math ${kind}">${md.utils.escapeHtml(tokens[idx].content)}</span>`;
};
md.renderer.rules.math_block = (tokens, idx) =>
  `<div class="math math-block">${md.utils.escapeHtml(tokens[idx].content)}</div>\n`;

type MathModule = typeof import("./math");
let mathModule: MathModule | null = null;
let mathLoading: Promise<void> | null = null;

// Typesets the math under `root` now when KaTeX is here; else loads it (once) and then
// typesets what the page's answers hold.
function typesetMath(root: ParentNode): void {
  const pending = root.querySelectorAll<HTMLElement>(".math:not(.typeset)");
  if (!pending.length) return;
  if (mathModule) {
    for (const node of Array.from(pending)) mathModule.typeset(node);
    return;
  }
  mathLoading ??= import("./math").then(
    (module) => {
      mathModule = module;
      typesetMath(document.querySelector("#messages") ?? document);
    },
    () => {
      mathLoading = null; // (a later answer tries again)
    },
  );
}

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
  typesetMath(fragment);
  return Array.from(fragment.childNodes).filter((n) => n.nodeType !== Node.TEXT_NODE || n.textContent?.trim());
}

// Renders the Markdown into the element, replacing its content.
export function renderMarkdown(target: HTMLElement, source: string): void {
  target.classList.add("markdown");
  replaceFrom(target, 0, markdownNodes(source));
}

// Puts `nodes` in place of the element's children from `from` on, keeping those equal
// to what they would be replaced with (while streaming: all but the last, usually).
function replaceFrom(target: HTMLElement, from: number, nodes: Node[]): void {
  const old = Array.from(target.childNodes).slice(from);
  let same = 0;
  while (same < old.length && same < nodes.length && old[same].isEqualNode(nodes[same])) same++;
  for (const node of old.slice(same)) node.remove();
  target.append(...nodes.slice(same));
}

const FENCE = /^ {0,3}(```|~~~|\$\$)/;

// Where the text can be cut for streaming: after the last blank line that is outside
// a fenced block or math block and followed by a line that does not continue a block
// (not indented). Before it, the text renders the same whatever comes later, as far
// as answers go (a loose list cut there shows as two lists until the end: the final
// render joins them). `from`: where the last cut was (always a line's start).
function lastCut(source: string, from: number): number {
  let cut = from;
  let open = false;
  let blank = false;
  let at = from;
  while (at < source.length) {
    const end = source.indexOf("\n", at);
    if (end === -1) break; // the last line may be incomplete
    const line = source.slice(at, end);
    if (blank && !open && line.trim() && !/^[ \t]/.test(line)) cut = at;
    if (FENCE.test(line) && !(line.trim().startsWith("$$") && line.trim().length > 2 && line.trim().endsWith("$$"))) {
      open = !open;
    }
    blank = !line.trim();
    at = end + 1;
  }
  return cut;
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
  // The text before `frozen` is rendered for good (until the final render) as the
  // element's first `frozenNodes` children: each render parses what follows only.
  private frozen = 0;
  private frozenNodes = 0;

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

  // The final render, of the whole text (the answer ended, or is replaced).
  flush(): void {
    if (this.frame !== null) cancelAnimationFrame(this.frame);
    this.frame = null;
    renderMarkdown(this.element, this.source);
    this.frozen = 0;
    this.frozenNodes = 0;
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
    const cut = lastCut(this.source, this.frozen);
    const done = cut > this.frozen ? markdownNodes(this.source.slice(this.frozen, cut)) : [];
    const rest = markdownNodes(this.source.slice(cut));
    replaceFrom(this.element, this.frozenNodes, [...done, ...rest]);
    this.frozen = cut;
    this.frozenNodes += done.length;
    const took = performance.now() - start;
    this.notBefore = start + took / BUSY_SHARE;
  }
}
