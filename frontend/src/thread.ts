// The open conversation: its current branch, the answers streaming into it, and the
// sends on their way. Everything the server or the model wrote is set as text only.
//
// Answers are Markdown, rendered by ./markdown (sanitised: no script, nothing remote),
// while they stream too; what users write stays plain text.
//
// Runs are event logs (docs/protocol.md): each run remembers the last `seq` it applied,
// ignores frames it has already seen and re-attaches after that seq when a gap shows or
// the socket comes back, so the text is neither doubled nor lost across reloads and
// reconnects. A send keeps its client id until the server answers it, so resending it
// after a reconnect never starts a second generation.
//
// Documents (./documents): a send carries the ready attachments (`document_ids`) and
// shows their titles; a run says how the model reads them; an answer over them is shown
// as `documents.marked` (citations as links that open their page, unverified quotations
// flagged) with a footer, live at `run.done` and from storage after a reload.

import type { Api, MessageTree, StepArtifact, ToolStep } from "./api";
import {
  type AnswerDocuments,
  type Attached,
  type Citation,
  answerDocuments,
  documentsFooter,
  markedAnswer,
  readingText,
} from "./documents";
import { button, el } from "./dom";
import { StreamingMarkdown, handleCopyClicks, renderMarkdown } from "./markdown";
import type { ClientFrame, RunEventFrame, SendFrame, ServerFrame } from "./protocol";
import { isRunEvent } from "./protocol";

export interface Ending {
  code: string;
  message: string;
}

export interface Step {
  id: string;
  parent_id: string | null;
  role: string;
  content: string;
  steps?: ToolStep[];
  sibling_ids: string[];
  sibling_index: number;
  sibling_count: number;
  error?: Ending | null;
  // A user message: the documents attached to it.
  document_ids?: string[];
  // An answer over documents: how they were read, its quotations checked.
  documents?: AnswerDocuments | null;
}

export interface AgentChoice {
  id: string; // "<plugin>.<agent>"
  title: string;
  description: string;
}

export interface PageData {
  // `agent`: the agent that answers the conversation; null: plain chat.
  conversation: { id: string; title: string; current_leaf_id: string | null; agent: string | null } | null;
  branch: Step[];
  runs: { id: string; user_message_id: string; state: string }[];
  agents: AgentChoice[];
}

// `chat.send`'s agent that returns a conversation to plain chat.
const PLAIN_CHAT = "none";
// How near the end of the thread (px) counts as being at it, so a streaming answer is followed.
const FOLLOW_SLACK_PX = 48;

interface RunView {
  id: string;
  userMessageId: string;
  lastSeq: number;
  active: boolean;
  // Ended, and the thread was fetched since: its answer (if any) is a message now.
  settled: boolean;
  messageId: string | null;
  cancelRequested: boolean;
  reattaching: boolean;
  element: HTMLLIElement;
  // The answer's text so far, rendered as it grows.
  answer: StreamingMarkdown;
  note: HTMLParagraphElement;
  // An agent's tool calls and progress, as they happen (text only).
  steps: HTMLDivElement;
  tools: Map<string, HTMLDetailsElement>;
  progress: HTMLParagraphElement | null;
  // How the model reads the documents in play (a `progress` frame of stage `documents`).
  reading: HTMLParagraphElement | null;
  documents: AnswerDocuments | null;
}

interface PendingSend {
  frame: SendFrame;
  // Where the new message goes: undefined after the branch's tip, else under this
  // message (null: a new root).
  parentId: string | null | undefined;
  element: HTMLLIElement | null;
  runId?: string;
  userMessageId?: string;
}

export interface ThreadOptions {
  api: Api;
  send: (frame: ClientFrame) => boolean;
  say: (message: string) => void;
  // The run of a send started a new conversation.
  started: (conversationId: string, title: string) => void;
  busyChanged: (busy: boolean) => void;
  // A message the server refused goes back into the composer, with its documents.
  restoreDraft: (content: string, documentIds: string[]) => void;
  // The server accepted a send: the documents it carried are attached for good.
  accepted: (documentIds: string[]) => void;
  // The titles of documents (attached to stored messages) the page does not know yet.
  documentTitles: (ids: string[]) => Promise<Map<string, string>>;
  // A citation's link was clicked: show its page.
  openCitation: (citation: Citation) => void;
  // The agent the member picked for what they send next; null: plain chat.
  chosenAgent: () => string | null;
}

function endingText(ending: Ending): string {
  if (ending.code === "cancelled") return `Stopped: ${ending.message || "cancelled."}`;
  return `The answer failed (${ending.code}): ${ending.message}`;
}

export class Thread {
  private branch: Step[] = [];
  private leafId: string | null = null; // the conversation's current leaf
  private readonly runs = new Map<string, RunView>();
  private readonly seenRuns = new Set<string>();
  private readonly pending = new Map<string, PendingSend>();
  private readonly endings = new Map<string, Ending>();
  private editing: { id: string; draft: string } | null = null;
  private fetchGeneration = 0;
  // Document titles by id, for the user messages that carried them.
  private readonly titles = new Map<string, string>();
  private readonly askedTitles = new Set<string>();
  conversationId: string | null;
  // The agent that answers the conversation (as the server last accepted); null: plain chat.
  agent: string | null;

  constructor(
    private readonly list: HTMLOListElement,
    data: PageData,
    private readonly options: ThreadOptions,
  ) {
    this.conversationId = data.conversation?.id ?? null;
    this.agent = data.conversation?.agent ?? null;
    this.leafId = data.conversation?.current_leaf_id ?? null;
    this.branch = data.branch.map((step) => ({ ...step, documents: answerDocuments(step.documents) }));
    for (const step of data.branch) if (step.error) this.endings.set(step.id, step.error);
    for (const run of data.runs) this.addRun(run.id, run.user_message_id);
    list.addEventListener("click", (event) => this.onClick(event));
    handleCopyClicks(list);
    this.learnTitles();
    this.render();
  }

  // An answer is streaming (the Stop button's time).
  get streaming(): boolean {
    for (const run of this.runs.values()) if (run.active) return true;
    return false;
  }

  // Streaming or sending: no new message, edit or branch switch meanwhile.
  get busy(): boolean {
    return this.streaming || this.pending.size > 0;
  }

  // --- sockets -----------------------------------------------------------------------

  // On every (re)connection: resend unanswered sends with their client ids, re-attach
  // every unfinished run after the last event it has, repeat requested cancels.
  resume(): void {
    for (const send of this.pending.values()) if (!send.runId) this.options.send(send.frame);
    for (const run of this.runs.values()) {
      if (!run.active) continue;
      this.attach(run);
      if (run.cancelRequested) this.options.send({ type: "run.cancel", run_id: run.id });
    }
  }

  private attach(run: RunView): void {
    this.options.send({ type: "run.attach", run_id: run.id, after: run.lastSeq, client_id: `attach:${run.id}` });
  }

  handle(frame: ServerFrame): void {
    if (isRunEvent(frame)) {
      this.onRunEvent(frame);
      return;
    }
    switch (frame.type) {
      case "run.started":
        this.onStarted(frame.run_id, frame.conversation_id, frame.user_message_id, frame.client_id);
        break;
      case "conversation.updated":
        if (frame.conversation_id === this.conversationId && frame.current_leaf_id !== undefined && !frame.deleted) {
          if (frame.current_leaf_id !== this.leafId) {
            this.leafId = frame.current_leaf_id;
            if (!this.busy) void this.refresh(); // switched elsewhere (another tab)
          }
        }
        break;
      case "error":
        this.onError(frame.code, frame.message, frame.client_id);
        break;
      default:
        break;
    }
  }

  private onError(code: string, message: string, clientId: string | undefined): void {
    const send = clientId ? this.pending.get(clientId) : undefined;
    if (send) {
      this.pending.delete(send.frame.client_id);
      if (send.frame.type === "chat.send") {
        this.options.say(`Not sent: ${message}`);
        if (send.parentId === undefined) this.options.restoreDraft(send.frame.content, send.frame.document_ids ?? []);
      } else this.options.say(`Could not regenerate: ${message}`);
      this.render();
      this.changed();
      // `unavailable`: the message was stored though no worker took its run.
      if (code === "unavailable") void this.refresh();
      return;
    }
    const runId = clientId?.startsWith("attach:") ? clientId.slice("attach:".length) : null;
    const run = runId ? this.runs.get(runId) : undefined;
    if (run && code === "not_found") {
      // Gone with its conversation: nothing more will come.
      this.runs.delete(run.id);
      this.render();
      this.changed();
      return;
    }
    this.options.say(`Error: ${message}`);
  }

  private onStarted(runId: string, conversationId: string, userMessageId: string, clientId?: string): void {
    const send = clientId ? this.pending.get(clientId) : undefined;
    if (!send && !this.runs.has(runId)) {
      // Started elsewhere (another tab of this member): follow it when it answers the
      // conversation on screen. A run seen here before is not followed again.
      if (!clientId && conversationId === this.conversationId && !this.seenRuns.has(runId)) {
        this.follow(runId, userMessageId);
      }
      return;
    }
    if (!this.conversationId) {
      this.conversationId = conversationId;
      this.options.started(conversationId, send?.frame.type === "chat.send" ? titleFrom(send.frame.content) : "");
    }
    if (send) {
      if (send.frame.type === "chat.regenerate") this.pending.delete(send.frame.client_id);
      else {
        // Accepted: the agent it named answers the conversation from now on.
        if (send.frame.agent !== undefined) this.agent = send.frame.agent === PLAIN_CHAT ? null : send.frame.agent;
        this.options.accepted(send.frame.document_ids ?? []);
        // Kept in view until the thread, fetched again, holds the new message.
        send.runId = runId;
        send.userMessageId = userMessageId;
      }
    }
    if (!this.runs.has(runId)) {
      this.addRun(runId, userMessageId);
      this.leafId = userMessageId;
      this.options.say("Generating an answer…");
    }
    this.render();
    this.changed();
    void this.refresh();
  }

  private follow(runId: string, userMessageId: string): void {
    const run = this.addRun(runId, userMessageId);
    this.leafId = userMessageId;
    this.attach(run);
    this.render();
    this.changed();
    void this.refresh();
  }

  private addRun(id: string, userMessageId: string): RunView {
    this.seenRuns.add(id);
    const body = el("div", { class: "body" });
    const note = el("p", { class: "note", hidden: "" });
    const steps = el("div", { class: "steps", hidden: "" });
    const element = el("li", { class: "message assistant streaming", "data-run-id": id, "aria-busy": "true" });
    element.append(steps, body, note);
    const run: RunView = {
      id,
      userMessageId,
      lastSeq: 0,
      active: true,
      settled: false,
      messageId: null,
      cancelRequested: false,
      reattaching: false,
      element,
      answer: new StreamingMarkdown(body),
      note,
      steps,
      tools: new Map(),
      progress: null,
      reading: null,
      documents: null,
    };
    this.runs.set(id, run);
    return run;
  }

  private onRunEvent(frame: RunEventFrame): void {
    const run = this.runs.get(frame.run_id);
    if (!run || !run.active) return;
    const trimmed = (frame.type === "run.done" || frame.type === "run.error") && frame.trimmed === true;
    if (frame.seq <= run.lastSeq) return; // seen already (a replay after a resend or re-attach)
    if (frame.seq > run.lastSeq + 1 && !trimmed) {
      // A gap: ask again from what we have (the new cursor replaces the old relay).
      if (!run.reattaching) {
        run.reattaching = true;
        this.attach(run);
      }
      return;
    }
    run.reattaching = false;
    run.lastSeq = frame.seq;
    // The thread scrolls (not the page): it follows the answer while the member is at its end.
    const list = this.list;
    const following = list.scrollHeight - list.scrollTop - list.clientHeight < FOLLOW_SLACK_PX;
    this.applyRunEvent(run, frame);
    if (following) list.scrollTop = list.scrollHeight;
  }

  private applyRunEvent(run: RunView, frame: RunEventFrame): void {
    switch (frame.type) {
      case "token":
        run.answer.append(frame.delta);
        break;
      case "tool.start":
        this.toolStarted(run, frame.call_id, frame.name, frame.arguments);
        break;
      case "tool.end":
        this.toolEnded(run, frame.call_id, frame.name, frame.result ?? "", frame.error ?? null, frame.truncated);
        if (frame.artifacts?.length) this.toolFiles(run, frame.call_id, frame.artifacts);
        break;
      case "progress":
        if (frame.stage === "documents") this.reads(run, frame.strategy, frame.message);
        else this.progressed(run, frame.stage, frame.message, frame.done, frame.total);
        break;
      case "run.done":
        if (frame.documents) this.answeredFromDocuments(run, frame.documents);
        this.ended(run, frame.message_id, null);
        this.options.say(`Done · ${frame.usage.completion_tokens} tokens`);
        break;
      case "run.error": {
        const ending = { code: frame.code, message: frame.message };
        this.ended(run, frame.message_id, ending);
        this.options.say(endingText(ending));
        break;
      }
      default:
        break;
    }
  }

  // --- an agent's steps (every value from the server or a tool set as text only) ---------

  private toolStarted(run: RunView, callId: string, name: string, args: unknown): void {
    const details = toolCall(callId, name, args);
    run.tools.set(callId, details);
    run.steps.append(details);
    run.steps.hidden = false;
  }

  private toolEnded(
    run: RunView,
    callId: string,
    name: string,
    result: string,
    error: string | null,
    truncated: boolean | undefined,
  ): void {
    let details = run.tools.get(callId);
    if (!details) {
      // Its start came before what this page saw (a trimmed log): show the end alone.
      this.toolStarted(run, callId, name, undefined);
      details = run.tools.get(callId) as HTMLDetailsElement;
    }
    toolCallEnded(details, result, error, truncated);
  }

  // The files a call produced: shown after the call (outside it, so images show while
  // the call stays folded).
  private toolFiles(run: RunView, callId: string, artifacts: StepArtifact[]): void {
    run.tools.get(callId)?.after(artifactList(artifacts));
  }

  private progressed(run: RunView, stage: string, message?: string, done?: number, total?: number): void {
    if (!run.progress) {
      run.progress = el("p", { class: "progress", role: "status" });
      run.steps.append(run.progress);
      run.steps.hidden = false;
    }
    const count = done !== undefined && total !== undefined ? ` (${done}/${total})` : "";
    run.progress.textContent = `${message || stage}${count}`;
  }

  // How the model reads the documents, and why: shown until the answer is stored (its
  // footer says it then).
  private reads(run: RunView, strategy: string | undefined, message: string | undefined): void {
    if (!run.reading) {
      run.reading = el("p", { class: "progress documents", role: "status" });
      run.steps.prepend(run.reading);
      run.steps.hidden = false;
    }
    run.reading.dataset.strategy = strategy ?? "";
    run.reading.textContent = readingText(strategy, message);
  }

  // The answer as it should be read: citations linked, unverified quotations flagged.
  private answeredFromDocuments(run: RunView, documents: AnswerDocuments): void {
    run.documents = documents;
    run.answer.flush();
    const body = run.answer.element;
    body.classList.remove("markdown");
    body.replaceChildren(markedAnswer(documents));
    run.reading?.remove();
    run.reading = null;
    run.element.append(documentsFooter(documents));
  }

  private ended(run: RunView, messageId: string | null, ending: Ending | null): void {
    run.active = false;
    run.messageId = messageId;
    if (!run.documents) run.answer.flush();
    run.element.classList.remove("streaming");
    run.element.removeAttribute("aria-busy");
    run.progress?.remove();
    run.progress = null;
    for (const details of run.tools.values()) {
      if (!details.classList.contains("running")) continue;
      details.classList.replace("running", "failed");
      const state = details.querySelector(".tool-state");
      if (state) state.textContent = " · ended with the run";
    }
    if (ending) {
      run.element.classList.add("failed");
      run.note.textContent = endingText(ending);
      run.note.hidden = false;
      if (messageId) this.endings.set(messageId, ending);
    }
    this.changed();
    void this.refresh();
  }

  // --- actions -------------------------------------------------------------------------

  sendMessage(content: string, parentId?: string | null, documents: Attached[] = []): void {
    const frame: SendFrame = { type: "chat.send", content, client_id: newClientId() };
    if (documents.length) frame.document_ids = documents.map((d) => d.id);
    for (const d of documents) this.titles.set(d.id, d.title);
    if (this.conversationId) frame.conversation_id = this.conversationId;
    if (parentId !== undefined) frame.parent_message_id = parentId;
    // Only a change is sent: the conversation keeps its agent (or plain chat) otherwise.
    const agent = this.options.chosenAgent();
    if (agent !== this.agent) frame.agent = agent ?? PLAIN_CHAT;
    const element = el("li", { class: "message user pending" });
    element.append(el("div", { class: "body" }, content));
    if (documents.length) element.append(this.attachedList(documents.map((d) => d.id)));
    this.pending.set(frame.client_id, { frame, parentId, element });
    this.editing = null;
    this.options.say(this.options.send(frame) ? "Sending…" : "Waiting for the connection…");
    this.render();
    this.changed();
  }

  private regenerate(step: Step): void {
    const frame: SendFrame = { type: "chat.regenerate", message_id: step.id, client_id: newClientId() };
    const element = el("li", { class: "message assistant pending" });
    element.append(el("div", { class: "body" }, "…"));
    this.pending.set(frame.client_id, { frame, parentId: step.parent_id, element });
    this.options.say(this.options.send(frame) ? "Regenerating…" : "Waiting for the connection…");
    this.render();
    this.changed();
  }

  stop(): void {
    let any = false;
    for (const run of this.runs.values()) {
      if (!run.active) continue;
      run.cancelRequested = true;
      any = this.options.send({ type: "run.cancel", run_id: run.id, client_id: `cancel:${run.id}` }) || any;
    }
    this.options.say(any ? "Stopping…" : "Will stop once connected again…");
  }

  private async switchTo(messageId: string): Promise<void> {
    if (!this.conversationId || this.busy) return;
    try {
      const tree = await this.options.api.switchBranch(this.conversationId, messageId);
      this.fetchGeneration++; // newer than any fetch in flight
      this.leafId = tree.current_leaf_id;
      this.apply(tree, new Set());
    } catch (error) {
      this.options.say(`Could not switch: ${error instanceof Error ? error.message : String(error)}`);
    }
  }

  // Fetch the thread again (after a run started or ended): stored answers replace the
  // streamed ones, and sibling counts are current.
  async refresh(): Promise<void> {
    if (!this.conversationId) return;
    const generation = ++this.fetchGeneration;
    // Only runs ended before this request are surely stored in its answer.
    const ended = new Set([...this.runs.values()].filter((r) => !r.active).map((r) => r.id));
    let tree: MessageTree;
    try {
      tree = await this.options.api.messages(this.conversationId);
    } catch (error) {
      this.options.say(`Could not load the conversation: ${error instanceof Error ? error.message : String(error)}`);
      return;
    }
    if (generation === this.fetchGeneration) this.apply(tree, ended);
  }

  private apply(tree: MessageTree, ended: Set<string>): void {
    const stored = new Map(tree.messages.map((m) => [m.id, m]));
    for (const id of ended) {
      const run = this.runs.get(id);
      if (!run) continue;
      run.settled = true;
      // The answer extends the branch when it was on the question (as the server does).
      if (run.messageId && this.leafId === run.userMessageId) this.leafId = run.messageId;
      // Stored: the message stands in for it. Without one it stays as a notice.
      if (run.messageId && stored.has(run.messageId)) this.runs.delete(id);
    }
    for (const [clientId, send] of this.pending) {
      if (send.userMessageId && stored.has(send.userMessageId)) this.pending.delete(clientId);
    }
    this.branch = tree.branch.flatMap((step) => {
      const message = stored.get(step.message_id);
      if (!message) return [];
      return [
        {
          id: message.id,
          parent_id: message.parent_id,
          role: message.role,
          content: message.content,
          steps: message.steps,
          document_ids: message.document_ids,
          documents: answerDocuments(message.documents),
          sibling_ids: step.sibling_ids,
          sibling_index: step.sibling_index,
          sibling_count: step.sibling_count,
        },
      ];
    });
    this.learnTitles();
    this.render();
    this.changed();
  }

  // Titles for the documents the branch's messages carried: from the answers that read
  // them, else asked for once.
  private learnTitles(): void {
    for (const step of this.branch) for (const d of step.documents?.documents ?? []) this.titles.set(d.id, d.title);
    const unknown = this.branch
      .flatMap((step) => step.document_ids ?? [])
      .filter((id) => !this.titles.has(id) && !this.askedTitles.has(id));
    if (!unknown.length) return;
    for (const id of unknown) this.askedTitles.add(id);
    void this.options.documentTitles(unknown).then((found) => {
      for (const [id, title] of found) this.titles.set(id, title);
      this.render();
    });
  }

  private attachedList(ids: string[]): HTMLUListElement {
    const list = el("ul", { class: "attached", "aria-label": "Attached documents" });
    for (const id of ids) list.append(el("li", { "data-document-id": id }, this.titles.get(id) ?? "a document"));
    return list;
  }

  private changed(): void {
    this.options.busyChanged(this.busy);
  }

  // --- rendering ---------------------------------------------------------------------

  private render(): void {
    const busy = this.busy;
    const items: HTMLElement[] = [];
    // A send with its own parent (an edit) or a regenerate replaces what follows that
    // parent on screen.
    let end = this.branch.length;
    for (const send of this.pending.values()) {
      if (send.parentId === undefined) continue;
      const at = send.parentId === null ? 0 : this.branch.findIndex((s) => s.id === send.parentId) + 1;
      if (at > 0 || send.parentId === null) end = Math.min(end, at);
    }
    for (let i = 0; i < end; i++) {
      const step = this.branch[i];
      items.push(this.messageElement(step, busy));
      const last = i === end - 1;
      // An answer on its way follows its question, in place of earlier answers while
      // the question is the conversation's current leaf (a regenerate).
      const live = [...this.runs.values()].filter(
        (r) => r.userMessageId === step.id && !r.settled && (last || this.leafId === step.id),
      );
      if (live.length) {
        items.push(...live.map((r) => r.element));
        break;
      }
      if (last) {
        // Ended without an answer to store (stopped at once, failed before any text).
        for (const r of this.runs.values()) if (r.userMessageId === step.id && r.settled) items.push(r.element);
      }
    }
    for (const send of this.pending.values()) {
      const run = send.runId ? this.runs.get(send.runId) : undefined;
      if (send.element) items.push(send.element);
      if (run && !items.includes(run.element)) items.push(run.element);
    }
    this.list.replaceChildren(...items);
    this.list.scrollTop = this.list.scrollHeight;
  }

  private messageElement(step: Step, busy: boolean): HTMLLIElement {
    const item = el("li", { class: `message ${step.role}`, "data-id": step.id });
    const editing = this.editing?.id === step.id ? this.editing : null;
    if (editing) {
      item.append(this.editor(step, editing));
      return item;
    }
    if (step.steps?.length) item.append(storedSteps(step.steps));
    if (step.documents) {
      const body = el("div", { class: "body" });
      body.append(markedAnswer(step.documents));
      item.append(body, documentsFooter(step.documents));
    } else if (step.role === "assistant") {
      const body = el("div", { class: "body" });
      renderMarkdown(body, step.content);
      item.append(body);
    } else item.append(el("div", { class: "body" }, step.content));
    if (step.document_ids?.length) item.append(this.attachedList(step.document_ids));
    const ending = step.error ?? this.endings.get(step.id);
    if (ending) {
      item.classList.add("failed");
      item.append(el("p", { class: "note" }, endingText(ending)));
    }
    const actions = el("div", { class: "actions" });
    if (step.sibling_count > 1) actions.append(this.switcher(step, busy));
    if (step.role === "user") {
      const edit = button("edit", "Edit", "Edit this message");
      edit.disabled = busy;
      actions.append(edit);
    } else if (step.role === "assistant") {
      const again = button("regenerate", "Regenerate", "Regenerate this answer");
      again.disabled = busy;
      actions.append(again);
    }
    item.append(actions);
    return item;
  }

  private switcher(step: Step, busy: boolean): HTMLElement {
    const what = step.role === "user" ? "message" : "answer";
    const nav = el("span", { class: "switcher", role: "group", "aria-label": `Versions of this ${what}` });
    const previous = button("previous", "‹", `Previous version`);
    const next = button("next", "›", `Next version`);
    previous.disabled = busy || step.sibling_index === 0;
    next.disabled = busy || step.sibling_index === step.sibling_count - 1;
    const position = el(
      "span",
      { class: "position", "aria-label": `Version ${step.sibling_index + 1} of ${step.sibling_count}` },
      `${step.sibling_index + 1}/${step.sibling_count}`,
    );
    nav.append(previous, position, next);
    return nav;
  }

  private editor(step: Step, editing: { draft: string }): HTMLFormElement {
    const form = el("form", { class: "editor" });
    const area = el("textarea", { rows: "3", "aria-label": "Edit your message" });
    area.value = editing.draft;
    area.addEventListener("input", () => {
      editing.draft = area.value;
    });
    const save = el("button", { type: "submit" }, "Send");
    const cancel = button("cancel-edit", "Cancel");
    form.append(area, save, cancel);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const content = area.value.trim();
      if (!content || this.busy) return;
      // The edited message reads the documents the original carried.
      const documents = (step.document_ids ?? []).map((id) => ({ id, title: this.titles.get(id) ?? "a document" }));
      this.sendMessage(content, step.parent_id, documents);
    });
    area.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        this.editing = null;
        this.render();
      }
    });
    queueMicrotask(() => area.focus());
    return form;
  }

  private onClick(event: Event): void {
    const link = (event.target as HTMLElement).closest<HTMLAnchorElement>("a.cite[data-cite]");
    if (link) {
      event.preventDefault();
      const citation = this.citationOf(link);
      if (citation) this.options.openCitation(citation);
      return;
    }
    const target = (event.target as HTMLElement).closest<HTMLButtonElement>("button[data-action]");
    const item = target?.closest<HTMLLIElement>("li[data-id]");
    const step = this.branch.find((s) => s.id === item?.dataset.id);
    if (!target || !step || target.disabled) return;
    switch (target.dataset.action) {
      case "edit":
        this.editing = { id: step.id, draft: step.content };
        this.render();
        break;
      case "cancel-edit":
        this.editing = null;
        this.render();
        break;
      case "regenerate":
        this.regenerate(step);
        break;
      case "previous":
        void this.switchTo(step.sibling_ids[step.sibling_index - 1]);
        break;
      case "next":
        void this.switchTo(step.sibling_ids[step.sibling_index + 1]);
        break;
      default:
        break;
    }
  }

  // The citation a link of an answer (stored, or just streamed) names.
  private citationOf(link: HTMLAnchorElement): Citation | undefined {
    const number = Number(link.dataset.cite);
    const item = link.closest<HTMLLIElement>("li.message");
    const runId = item?.dataset.runId;
    const documents = runId
      ? this.runs.get(runId)?.documents
      : this.branch.find((s) => s.id === item?.dataset.id)?.documents;
    return documents?.citations.find((c) => c.number === number);
  }
}

// The first-line title the server gives a new conversation (until a better one comes).
export function titleFrom(content: string): string {
  const line = content.split(/\s+/).filter(Boolean).join(" ");
  return line.length > 80 ? `${line.slice(0, 80)}…` : line;
}

// An agent's tool call: its name and arguments, open to read; running until it ends.
function toolCall(callId: string, name: string, args: unknown): HTMLDetailsElement {
  const details = el("details", { class: "tool running", "data-call-id": callId });
  const summary = el("summary");
  summary.append(el("span", { class: "tool-name" }, name), el("span", { class: "tool-state" }, " · running…"));
  details.append(
    summary,
    el("p", { class: "label" }, "Arguments"),
    el("pre", { class: "tool-arguments" }, formatArguments(args)),
  );
  return details;
}

function toolCallEnded(details: HTMLDetailsElement, result: string, error: string | null, truncated?: boolean): void {
  details.classList.remove("running");
  details.classList.add(error ? "failed" : "done");
  const state = details.querySelector(".tool-state");
  if (state) state.textContent = error ? " · failed" : " · done";
  if (error) details.append(el("p", { class: "label" }, "Error"), el("pre", { class: "tool-error" }, error));
  if (result) {
    details.append(
      el("p", { class: "label" }, truncated ? "Result (cut short)" : "Result"),
      el("pre", { class: "tool-result" }, result),
    );
  }
}

// The tool calls stored with an agent's answer, as they showed while it streamed.
function storedSteps(steps: ToolStep[]): HTMLDivElement {
  const box = el("div", { class: "steps" });
  for (const step of steps) {
    const details = toolCall(step.call_id, step.name, step.arguments);
    toolCallEnded(details, step.result ?? "", step.error, step.truncated);
    box.append(details);
    if (step.artifacts?.length) box.append(artifactList(step.artifacts));
  }
  return box;
}

// The files a tool call produced (a sandboxed run's): raster images shown, with their
// name as the alternative text, and everything as a download link with its size. The
// server decides what may be shown inline (it serves the rest as attachments); SVG,
// which may carry scripts, is never put in an <img> here either.
const INLINE_IMAGES = new Set(["image/png", "image/jpeg", "image/gif", "image/webp"]);
const ARTIFACTS_URL = "/api/v1/artifacts/";

export function artifactList(artifacts: StepArtifact[]): HTMLDivElement {
  const box = el("div", { class: "artifacts" });
  for (const artifact of artifacts) {
    const url = `${ARTIFACTS_URL}${encodeURIComponent(artifact.id)}/content`;
    const item = el("figure", { class: "artifact", "data-artifact-id": artifact.id });
    if (INLINE_IMAGES.has(artifact.media_type)) {
      item.append(el("img", { src: url, alt: artifact.name, loading: "lazy" }));
    }
    const caption = el("figcaption");
    caption.append(
      el("a", { href: url, download: artifact.name.split("/").pop() ?? artifact.name }, artifact.name),
      el("span", { class: "artifact-size" }, ` · ${sizeText(artifact.size)}`),
    );
    item.append(caption);
    box.append(item);
  }
  return box;
}

export function sizeText(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / (1024 * 1024)).toFixed(1)} MiB`;
}

// A tool's arguments as the model gave them (an object, normally), readable.
function formatArguments(args: unknown): string {
  if (args === undefined) return "";
  try {
    return JSON.stringify(args, null, 2);
  } catch {
    return String(args);
  }
}

// A fresh client id (crypto.randomUUID exists in secure contexts only).
function newClientId(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
