// The chat page: wires the conversation thread, the sidebar and the composer (with its
// document attachments) to the websocket (/ws/v1/, protocol v1) and the REST API (/api/v1/).

import { Api } from "./api";
import { Attachments, DocumentsClient, PageViewer } from "./documents";
import { required } from "./dom";
import type { ClientFrame } from "./protocol";
import { Sidebar } from "./sidebar";
import { ChatSocket } from "./socket";
import { type PageData, Thread } from "./thread";

const script = required<HTMLScriptElement>("#parley-client");
const homeUrl = script.dataset.homeUrl ?? "/";
const conversationUrl = script.dataset.conversationUrl ?? "/c/";
const api = new Api(script.dataset.apiUrl ?? "/api/v1/", script.dataset.csrfToken ?? "");
const documentsClient = new DocumentsClient(script.dataset.apiUrl ?? "/api/v1/", script.dataset.csrfToken ?? "");
const data = JSON.parse(required<HTMLScriptElement>("#parley-chat").textContent ?? "{}") as PageData;

const form = required<HTMLFormElement>("#composer");
const prompt = required<HTMLTextAreaElement>("#prompt");
// Plain chat (""), or one of the agents the tenant enabled.
const agentSelect = required<HTMLSelectElement>("#agent");
// One of the pool's models the tenant may use; the server rendered the conversation's
// (while it may still be used), else the tenant's default, selected. Empty: none served.
const modelSelect = required<HTMLSelectElement>("#model");
const sendButton = required<HTMLButtonElement>("#send");
const stopButton = required<HTMLButtonElement>("#stop");
const status = required<HTMLParagraphElement>("#status");
const heading = required<HTMLHeadingElement>("#conversation-title");
const fileInput = required<HTMLInputElement>("#attach-file");

let connected = false;
let busy = false;

function say(message: string): void {
  status.textContent = message;
}

const attachments = new Attachments(required<HTMLUListElement>("#attachments"), documentsClient, () => {
  // A document got ready: the message that waited for it may go now.
  if (status.dataset.blockedBy && !attachments.blocker()) {
    delete status.dataset.blockedBy;
    say("");
  }
});
const viewer = new PageViewer(required<HTMLDialogElement>("#page-viewer"), documentsClient);

function updateControls(): void {
  sendButton.disabled = busy || !connected;
  stopButton.hidden = !thread.streaming;
}

function showTitle(title: string): void {
  const shown = title || "Untitled";
  heading.textContent = shown;
  heading.closest("header")?.removeAttribute("hidden");
  document.title = `${shown} · Parley`;
}

const socket = new ChatSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws/v1/`, {
  open() {
    connected = true;
    if (status.textContent?.startsWith("Disconnected")) say("");
    thread.resume();
    updateControls();
  },
  closed(final) {
    connected = false;
    say(final ? "Signed out or access ended: reload the page." : "Disconnected; reconnecting…");
    updateControls();
  },
  frame(frame) {
    if (frame.type === "conversation.updated") {
      if (frame.deleted) sidebar.deleted(frame.conversation_id);
      else if (frame.title !== undefined) {
        sidebar.setTitle(frame.conversation_id, frame.title);
        if (frame.conversation_id === thread.conversationId) showTitle(frame.title);
      }
    }
    if (frame.type === "document.updated") attachments.update(frame);
    thread.handle(frame);
  },
});

// What asks for an answer carries the picked model; the server keeps it as the
// conversation's, so the picker shows it again on the conversation's page. A frame sent
// again (after a reconnect) keeps the model it was first sent with.
function withModel(frame: ClientFrame): ClientFrame {
  if ((frame.type === "chat.send" || frame.type === "chat.regenerate") && frame.model === undefined && modelSelect.value) {
    frame.model = modelSelect.value;
  }
  return frame;
}

const thread = new Thread(required<HTMLOListElement>("#messages"), data, {
  api,
  send: (frame) => socket.send(withModel(frame)),
  say,
  started(conversationId, title) {
    history.replaceState(null, "", `${conversationUrl}${conversationId}/`);
    sidebar.add(conversationId, title);
    sidebar.markCurrent(conversationId);
    showTitle(title);
  },
  busyChanged(value) {
    busy = value;
    updateControls();
  },
  restoreDraft(content, documentIds) {
    if (!prompt.value.trim()) prompt.value = content;
    attachments.restore(documentIds);
  },
  accepted(documentIds) {
    attachments.forget(documentIds);
  },
  async documentTitles(ids) {
    const titles = new Map<string, string>();
    await Promise.all(
      ids.map((id) =>
        documentsClient.get(id).then(
          (d) => titles.set(id, d.title),
          () => titles.set(id, "a deleted document"),
        ),
      ),
    );
    return titles;
  },
  openCitation(citation) {
    void viewer.open(citation);
  },
  chosenAgent: () => agentSelect.value || null,
});

// The open conversation was deleted: leave it once. The API's answer and the socket's
// `conversation.updated` both say so; a second navigation would abort the first.
let leaving = false;

const sidebar = new Sidebar({
  api,
  conversationUrl,
  currentId: () => thread.conversationId,
  openDeleted: () => {
    if (leaving) return;
    leaving = true;
    location.assign(homeUrl);
  },
  say,
});

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const content = prompt.value.trim();
  if (!content || busy) return;
  const blocked = attachments.blocker();
  if (blocked) {
    status.dataset.blockedBy = "attachments";
    say(`Not sent: ${blocked}`);
    return;
  }
  prompt.value = "";
  thread.sendMessage(content, undefined, attachments.take());
});

// Attach: the file picker, or files dropped on the composer.
fileInput.addEventListener("change", () => {
  for (const file of Array.from(fileInput.files ?? [])) attachments.add(file);
  fileInput.value = ""; // the same file may be picked again
});
form.addEventListener("dragover", (event) => {
  if (!event.dataTransfer?.types.includes("Files")) return;
  event.preventDefault();
  form.classList.add("dropping");
});
form.addEventListener("dragleave", () => form.classList.remove("dropping"));
form.addEventListener("drop", (event) => {
  form.classList.remove("dropping");
  if (!event.dataTransfer?.files.length) return;
  event.preventDefault();
  for (const file of Array.from(event.dataTransfer.files)) attachments.add(file);
});
prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    form.requestSubmit();
  }
});
stopButton.addEventListener("click", () => thread.stop());

// The conversation's agent is picked (the server rendered it so); one no longer
// available is not among the choices, so a send goes back to plain chat.
agentSelect.value = data.agents.some((agent) => agent.id === thread.agent) ? (thread.agent ?? "") : "";

busy = thread.busy;
updateControls();
socket.connect();
