// Documents on the chat page: the REST calls for them (/api/v1/documents, docs/rest-api.md),
// the composer's attachments (upload with progress, the ingestion's progress, refusals),
// an answer over documents as it should be read (its citations as links, unverified
// quotations flagged) and the page viewer a citation opens.
//
// Document text and answers are untrusted: they are only ever set as text.

import { ApiError } from "./api";
import { button, el } from "./dom";
import type { AnswerDocuments, DocumentUpdatedFrame } from "./protocol.gen";

export type { AnswerDocuments } from "./protocol.gen";
export type Citation = AnswerDocuments["citations"][number];

export type DocumentState = DocumentUpdatedFrame["state"];

// GET /api/v1/documents/{id} (platform/documents/schemas.py DocumentOut): what the page uses.
export interface DocumentInfo {
  id: string;
  title: string;
  state: DocumentState;
  stage: string;
  progress_done: number;
  progress_total: number | null;
  error_message: string;
  page_count: number | null;
}

// GET /api/v1/documents/{id}/pages/{n}.
export interface PageText {
  document_id: string;
  number: number;
  text: string;
  parsed: boolean;
}

// A document is ready to attach, or will never be.
function settled(state: DocumentState): boolean {
  return state === "ready" || state === "failed";
}

// How long a document being read may go without a `document.updated` frame before the
// page asks the API (the socket may be reconnecting, or the frame lost).
const POLL_MS = 1500;

export class DocumentsClient {
  constructor(
    private readonly base: string,
    private readonly csrfToken: string,
  ) {}

  // POST /documents, multipart. XMLHttpRequest, as fetch reports no upload progress.
  upload(file: File, progress: (sent: number, total: number) => void): { done: Promise<DocumentInfo>; abort(): void } {
    const request = new XMLHttpRequest();
    const done = new Promise<DocumentInfo>((resolve, reject) => {
      request.open("POST", `${this.base}documents`);
      request.setRequestHeader("Accept", "application/json");
      request.setRequestHeader("X-CSRFToken", this.csrfToken);
      request.withCredentials = true;
      request.upload.addEventListener("progress", (event) => {
        if (event.lengthComputable) progress(event.loaded, event.total);
      });
      request.addEventListener("load", () => {
        let body: unknown = null;
        try {
          body = JSON.parse(request.responseText);
        } catch {
          // Not JSON (a proxy's error page): the status says enough.
        }
        if (request.status >= 200 && request.status < 300 && body) resolve(body as DocumentInfo);
        else reject(new ApiError(request.status, detailOf(body) ?? `${request.status} ${request.statusText}`));
      });
      request.addEventListener("error", () => reject(new ApiError(0, "The upload failed: no connection.")));
      request.addEventListener("abort", () => reject(new ApiError(0, "Upload cancelled.")));
      const form = new FormData();
      form.append("file", file);
      request.send(form);
    });
    return { done, abort: () => request.abort() };
  }

  get(id: string): Promise<DocumentInfo> {
    return this.read(`documents/${encodeURIComponent(id)}`);
  }

  page(id: string, number: number): Promise<PageText> {
    return this.read(`documents/${encodeURIComponent(id)}/pages/${number}`);
  }

  private async read<T>(path: string): Promise<T> {
    const response = await fetch(this.base + path, {
      headers: { Accept: "application/json" },
      credentials: "same-origin",
    });
    let body: unknown = null;
    try {
      body = await response.json();
    } catch {
      // As above.
    }
    if (!response.ok) throw new ApiError(response.status, detailOf(body) ?? `${response.status} ${response.statusText}`);
    return body as T;
  }
}

function detailOf(body: unknown): string | null {
  if (body && typeof body === "object" && "detail" in body) {
    const detail = (body as { detail: unknown }).detail;
    if (typeof detail === "string") return detail;
  }
  return null;
}

// --- the composer's attachments ------------------------------------------------------

export interface Attached {
  id: string;
  title: string;
}

interface Chip {
  key: number;
  id: string | null; // null until the upload is answered
  title: string;
  state: DocumentState | "uploading" | "refused";
  stage: string;
  done: number;
  total: number | null;
  error: string;
  element: HTMLLIElement;
  label: HTMLSpanElement;
  bar: HTMLProgressElement;
  reason: HTMLParagraphElement;
  abort: (() => void) | null;
  lastNews: number;
  poll: number | null;
}

// What a chip says of its document.
function chipState(chip: Chip): string {
  const count = chip.total ? ` ${chip.done}/${chip.total}` : chip.done ? ` ${chip.done}` : "";
  switch (chip.state) {
    case "uploading":
      return chip.total ? `Uploading ${Math.floor((100 * chip.done) / chip.total)}%` : "Uploading…";
    case "uploaded":
      return "Uploaded, waiting to be read…";
    case "parsing":
      return chip.stage === "chunks" ? `Splitting into passages${count}` : `Reading pages${count}`;
    case "embedding":
      return `Indexing passages${count}`;
    case "ready":
      return "Ready";
    case "failed":
      return "Could not be read";
    case "refused":
      return "Refused";
  }
}

// The attachments of the message being written: a chip per document, with its upload
// and ingestion progress; the ready ones go with the next `chat.send`.
export class Attachments {
  private readonly chips = new Map<number, Chip>();
  // Taken by a send the server has not accepted yet: put back if it refuses it.
  private readonly taken = new Map<string, Attached>();
  private nextKey = 1;

  constructor(
    private readonly list: HTMLUListElement,
    private readonly client: DocumentsClient,
    private readonly changed: () => void,
  ) {
    list.addEventListener("click", (event) => {
      const target = (event.target as HTMLElement).closest<HTMLButtonElement>("button[data-action=detach]");
      const key = Number(target?.closest<HTMLLIElement>("li[data-key]")?.dataset.key);
      if (target && this.chips.has(key)) this.remove(key);
    });
  }

  get count(): number {
    return this.chips.size;
  }

  add(file: File): void {
    const chip = this.chip(file.name || "Untitled");
    chip.state = "uploading";
    chip.total = file.size;
    this.show(chip);
    const upload = this.client.upload(file, (sent, total) => {
      chip.done = sent;
      chip.total = total;
      this.show(chip);
    });
    chip.abort = upload.abort;
    upload.done.then(
      (document) => {
        chip.abort = null;
        chip.id = document.id;
        chip.element.dataset.documentId = document.id;
        this.apply(chip, document);
      },
      (error: unknown) => {
        chip.abort = null;
        if (!this.chips.has(chip.key)) return; // removed meanwhile
        chip.state = "refused";
        chip.error = error instanceof Error ? error.message : String(error);
        this.show(chip);
      },
    );
  }

  // A `document.updated` frame (the owner's sockets get one at every step of its ingestion).
  update(frame: DocumentUpdatedFrame): void {
    for (const chip of this.chips.values()) {
      if (chip.id !== frame.document_id) continue;
      chip.lastNews = Date.now();
      chip.state = frame.state;
      chip.stage = frame.stage;
      chip.done = frame.done;
      chip.total = frame.total;
      chip.error = frame.error ?? "";
      this.show(chip);
    }
  }

  // Why the message cannot be sent with its attachments now, or null.
  blocker(): string | null {
    for (const chip of this.chips.values()) {
      if (chip.state === "ready") continue;
      if (chip.state === "failed" || chip.state === "refused") {
        return `“${chip.title}” cannot be attached (${chip.error || "it could not be read"}): remove it to send.`;
      }
      return `“${chip.title}” is not ready yet (${chipState(chip).toLowerCase()}): send when it is.`;
    }
    return null;
  }

  // The ready documents, for a send: their chips leave the composer.
  take(): Attached[] {
    const taken: Attached[] = [];
    for (const chip of [...this.chips.values()]) {
      if (chip.state !== "ready" || !chip.id) continue;
      taken.push({ id: chip.id, title: chip.title });
      this.taken.set(chip.id, { id: chip.id, title: chip.title });
      this.remove(chip.key);
    }
    return taken;
  }

  // The send was accepted (or given up): what it took is no longer to be put back.
  forget(ids: string[]): void {
    for (const id of ids) this.taken.delete(id);
  }

  // The server refused the send: its documents go back into the composer.
  restore(ids: string[]): void {
    for (const id of ids) {
      const attached = this.taken.get(id);
      this.taken.delete(id);
      if (!attached || [...this.chips.values()].some((c) => c.id === id)) continue;
      const chip = this.chip(attached.title);
      chip.id = id;
      chip.element.dataset.documentId = id;
      chip.state = "ready";
      this.show(chip);
    }
  }

  private chip(title: string): Chip {
    const key = this.nextKey++;
    const element = el("li", { class: "chip", "data-key": String(key) });
    const label = el("span", { class: "chip-state" });
    const bar = el("progress", { max: "1", value: "0" });
    const reason = el("p", { class: "chip-error", role: "alert", hidden: "" });
    element.append(
      el("span", { class: "chip-title" }, title),
      label,
      bar,
      button("detach", "×", `Remove ${title}`),
      reason,
    );
    const chip: Chip = {
      key,
      id: null,
      title,
      state: "uploaded",
      stage: "",
      done: 0,
      total: null,
      error: "",
      element,
      label,
      bar,
      reason,
      abort: null,
      lastNews: Date.now(),
      poll: null,
    };
    this.chips.set(key, chip);
    this.list.append(element);
    this.list.hidden = false;
    return chip;
  }

  private apply(chip: Chip, document: DocumentInfo): void {
    chip.title = document.title || chip.title;
    chip.state = document.state;
    chip.stage = document.stage;
    chip.done = document.progress_done;
    chip.total = document.progress_total;
    chip.error = document.error_message;
    this.show(chip);
  }

  private show(chip: Chip): void {
    if (!this.chips.has(chip.key)) return;
    chip.element.className = `chip ${chip.state}`;
    const title = chip.element.querySelector(".chip-title");
    if (title) title.textContent = chip.title;
    chip.label.textContent = chipState(chip);
    const working = !settled(chip.state as DocumentState) && chip.state !== "refused";
    chip.bar.hidden = !working;
    if (chip.total) {
      chip.bar.max = chip.total;
      chip.bar.value = Math.min(chip.done, chip.total);
    } else chip.bar.removeAttribute("value"); // under way, how far not known
    chip.reason.textContent = chip.error;
    chip.reason.hidden = !(chip.error && (chip.state === "failed" || chip.state === "refused"));
    chip.element.setAttribute("aria-busy", String(working));
    if (working && chip.id && chip.poll === null) this.watch(chip);
    if (!working && chip.poll !== null) this.unwatch(chip);
    this.changed();
  }

  // While no frame comes, ask the API how far the document is.
  private watch(chip: Chip): void {
    chip.poll = window.setInterval(() => {
      if (!chip.id || Date.now() - chip.lastNews < POLL_MS) return;
      chip.lastNews = Date.now();
      this.client.get(chip.id).then(
        (document) => {
          if (this.chips.has(chip.key)) this.apply(chip, document);
        },
        (error: unknown) => {
          if (!(error instanceof ApiError) || error.status !== 404 || !this.chips.has(chip.key)) return;
          chip.state = "failed";
          chip.error = "The document was deleted.";
          this.show(chip);
        },
      );
    }, POLL_MS / 2);
  }

  private unwatch(chip: Chip): void {
    if (chip.poll !== null) window.clearInterval(chip.poll);
    chip.poll = null;
  }

  private remove(key: number): void {
    const chip = this.chips.get(key);
    if (!chip) return;
    this.unwatch(chip);
    chip.abort?.();
    this.chips.delete(key);
    chip.element.remove();
    this.list.hidden = this.chips.size === 0;
    this.changed();
  }
}

// --- an answer over documents --------------------------------------------------------

// A citation marker of `documents.marked` (platform/documents/citations.py answer_mark),
// ` ([p. 12](#cite-1))` or `([pp. 12–13](#cite-2))`, or the start of an unverified one.
const MARKER = /\[(pp?\. [^\]\n]{1,40})\]\(#cite-(\d+)\)|\[unverified: /g;
const UNVERIFIED = "[unverified: ";

// `documents.marked` as nodes: its citations as links (`a.cite[data-cite]`), its
// unverified quotations flagged (`span.unverified`), the rest as text. A citation marker
// is a link only right after its quotation, and once: the model cannot make one of its
// own words look cited by writing the marker itself.
export function markedAnswer(answer: AnswerDocuments): DocumentFragment {
  const text = answer.marked;
  const quotes = new Map(answer.citations.map((c) => [c.number, c.quote]));
  const linked = new Set<number>();
  const out = document.createDocumentFragment();
  let position = 0;
  MARKER.lastIndex = 0;
  for (let match = MARKER.exec(text); match; match = MARKER.exec(text)) {
    let node: HTMLElement | null = null;
    let end = MARKER.lastIndex;
    if (match[2] !== undefined) {
      const number = Number(match[2]);
      const quote = quotes.get(number);
      if (quote !== undefined && !linked.has(number) && follows(text.slice(0, match.index), quote)) {
        linked.add(number);
        node = el("a", { class: "cite", href: `#cite-${number}`, "data-cite": String(number) }, match[1]);
        node.title = "Open the page this quotation is from";
      }
    } else {
      const close = unverifiedEnd(text, match.index + UNVERIFIED.length, answer.unverified);
      if (close !== null) {
        node = el("span", { class: "unverified", title: "Not found in the documents: not a quotation" });
        node.append(el("span", { class: "flag" }, "unverified"), text.slice(match.index + UNVERIFIED.length, close));
        end = close + 1;
      }
    }
    if (!node) continue;
    out.append(text.slice(position, match.index), node);
    position = end;
    MARKER.lastIndex = end;
  }
  out.append(text.slice(position));
  return out;
}

// Letters and digits only: a quotation and the text it ends, compared past quote marks,
// blockquote markers, line breaks and spaces.
function bare(text: string): string {
  return text.normalize("NFC").replace(/[^\p{L}\p{N}]+/gu, "");
}

// Whether `before` (the answer up to a marker) ends with the quotation.
function follows(before: string, quote: string): boolean {
  const tail = bare(quote).slice(-24);
  return tail.length > 0 && bare(before.slice(-4 * quote.length - 16)).endsWith(tail);
}

// Where the `]` closing an unverified quotation that starts at `from` is: after one of
// the quotations the check reported (they may hold brackets), else the first `]` that
// balances the brackets opened within.
function unverifiedEnd(text: string, from: number, quotes: string[]): number | null {
  for (const quote of quotes) if (text.startsWith(`${quote}]`, from)) return from + quote.length;
  let depth = 0;
  for (let i = from; i < text.length; i++) {
    if (text[i] === "[") depth++;
    else if (text[i] === "]") {
      if (depth === 0) return i;
      depth--;
    }
  }
  return null;
}

const STRATEGIES: Record<string, string> = {
  whole: "Read whole",
  retrieval: "Read the best-matching passages",
  map_reduce: "Read section by section, then merged",
};

// How the model read the documents: the strategy and why.
export function readingText(strategy: string | undefined, reason: string | undefined): string {
  const how = (strategy && STRATEGIES[strategy]) || "Reading the documents";
  return reason ? `${how}: ${reason}` : how;
}

// Under an answer over documents: how they were read, and the quotations checked.
export function documentsFooter(answer: AnswerDocuments): HTMLDivElement {
  const footer = el("div", { class: "documents-footer" });
  footer.append(el("p", { class: "reading" }, readingText(answer.strategy, answer.reason)));
  const { verified, unverified } = answer.quotes;
  if (verified + unverified > 0) {
    footer.append(el("p", { class: "quotes" }, `Quotes: ${verified} verified, ${unverified} unverified`));
  }
  return footer;
}

// A stored message's `documents` (an empty object when it has none).
export function answerDocuments(value: unknown): AnswerDocuments | null {
  if (!value || typeof value !== "object") return null;
  const candidate = value as Partial<AnswerDocuments>;
  return typeof candidate.marked === "string" && Array.isArray(candidate.citations) ? (value as AnswerDocuments) : null;
}

// --- the page viewer -----------------------------------------------------------------

// A dialog showing the page a citation points at, the quotation highlighted and scrolled
// into view. Escape or its close button closes it.
export class PageViewer {
  private generation = 0;
  private readonly heading: HTMLElement;
  private readonly status: HTMLElement;
  private readonly body: HTMLElement;

  constructor(
    private readonly dialog: HTMLDialogElement,
    private readonly client: DocumentsClient,
  ) {
    this.heading = dialog.querySelector<HTMLElement>(".viewer-title") ?? dialog;
    this.status = dialog.querySelector<HTMLElement>(".viewer-status") ?? dialog;
    this.body = dialog.querySelector<HTMLElement>(".page-text") ?? dialog;
    dialog.querySelector("button[data-action=close-viewer]")?.addEventListener("click", () => dialog.close());
    // A click on the backdrop (outside the dialog's box) closes it too.
    dialog.addEventListener("click", (event) => {
      if (event.target === dialog) {
        const r = dialog.getBoundingClientRect();
        const inside = event.clientX >= r.left && event.clientX <= r.right && event.clientY >= r.top && event.clientY <= r.bottom;
        if (!inside) dialog.close();
      }
    });
  }

  async open(citation: Citation): Promise<void> {
    const generation = ++this.generation;
    const pages =
      citation.page_start === citation.page_end ? `p. ${citation.page_start}` : `pp. ${citation.page_start}–${citation.page_end}`;
    this.heading.textContent = `${citation.title}, ${pages}`;
    this.status.textContent = "Loading the page…";
    this.body.replaceChildren();
    if (!this.dialog.open) this.dialog.showModal();
    let page: PageText;
    try {
      page = await this.client.page(citation.document_id, citation.page_start);
    } catch (error) {
      if (generation === this.generation) {
        this.status.textContent = `Could not load the page: ${error instanceof Error ? error.message : String(error)}`;
      }
      return;
    }
    if (generation !== this.generation) return;
    if (!page.parsed) {
      this.status.textContent = "This page is not read yet.";
      return;
    }
    // The offsets count characters (code points), as the server does.
    const chars = Array.from(page.text);
    const start = Math.min(citation.char_start, chars.length);
    const end = citation.page_end === citation.page_start ? Math.min(citation.char_end, chars.length) : chars.length;
    const mark = el("mark", { class: "quoted" }, chars.slice(start, end).join(""));
    this.body.replaceChildren(chars.slice(0, start).join(""), mark, chars.slice(end).join(""));
    this.status.textContent =
      citation.page_end === citation.page_start
        ? `Page ${page.number}: the quotation is highlighted.`
        : `Page ${page.number}: the quotation starts here and goes on to p. ${citation.page_end}.`;
    mark.scrollIntoView({ block: "center" });
  }
}
