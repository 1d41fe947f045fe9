// Math in answers, typeset by KaTeX: loaded only when an answer holds some (it is most
// of the weight of the page's JavaScript otherwise). KaTeX writes MathML here, which
// Chromium and Firefox lay out themselves: its HTML output needs inline styles, which
// the page's CSP refuses, and its stylesheet and fonts. The TeX is the model's, so
// KaTeX runs untrusted (no \href, \url, \html*), its expansion bounded, and what it
// writes passes DOMPurify's MathML profile too.

import DOMPurify from "dompurify";
import katex from "katex";

export function typeset(node: HTMLElement): void {
  const tex = node.textContent ?? "";
  let markup: string;
  try {
    markup = katex.renderToString(tex, {
      output: "mathml",
      displayMode: !node.classList.contains("math-inline"),
      throwOnError: true,
      trust: false,
      strict: "ignore",
      maxSize: 50,
      maxExpand: 500,
    });
  } catch {
    node.classList.add("typeset", "math-error"); // not TeX KaTeX knows: left as written
    return;
  }
  const math = DOMPurify.sanitize(markup, {
    USE_PROFILES: { mathMl: true },
    FORBID_ATTR: ["style", "href"],
    // KaTeX repeats the TeX in an <annotation>: dropped, not shown as text.
    ADD_FORBID_CONTENTS: ["annotation"],
    RETURN_DOM_FRAGMENT: true,
  });
  node.replaceChildren(math);
  node.classList.add("typeset");
  node.setAttribute("aria-label", tex);
}
