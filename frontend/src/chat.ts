// The minimal chat page: send a message over /ws/v1/ and render the answer as it streams.
// Model output is untrusted: it is only ever set as text, never as HTML.

import type { ServerFrame } from "./protocol";

interface ThreadMessage {
  id: string;
  role: string;
  content: string;
}

const script = document.currentScript ?? document.querySelector<HTMLScriptElement>("script[data-conversation-url]");
const conversationUrl = script?.getAttribute("data-conversation-url") ?? "/c/";
let conversationId = script?.getAttribute("data-conversation-id") || null;

const list = document.getElementById("messages") as HTMLOListElement;
const form = document.getElementById("composer") as HTMLFormElement;
const prompt = document.getElementById("prompt") as HTMLTextAreaElement;
const sendButton = document.getElementById("send") as HTMLButtonElement;
const status = document.getElementById("status") as HTMLParagraphElement;

const answers = new Map<string, HTMLLIElement>();
let socket: WebSocket | null = null;
let pending: { content: string; clientId: string } | null = null;
let retry = 0;

function addMessage(role: string, content: string): HTMLLIElement {
  const item = document.createElement("li");
  item.className = role;
  item.textContent = content;
  list.appendChild(item);
  list.scrollTop = list.scrollHeight;
  return item;
}

function setBusy(busy: boolean, text = ""): void {
  sendButton.disabled = busy;
  status.textContent = text;
}

function handle(frame: ServerFrame): void {
  switch (frame.type) {
    case "run.started": {
      pending = null;
      if (!conversationId) {
        conversationId = frame.conversation_id;
        history.replaceState(null, "", `${conversationUrl}${conversationId}/`);
      }
      const item = addMessage("assistant", "");
      item.dataset.runId = frame.run_id;
      answers.set(frame.run_id, item);
      setBusy(true, "Generating…");
      break;
    }
    case "token": {
      const item = answers.get(frame.run_id);
      if (item) {
        item.textContent = (item.textContent ?? "") + frame.delta;
        list.scrollTop = list.scrollHeight;
      }
      break;
    }
    case "run.done":
      answers.delete(frame.run_id);
      setBusy(false, `${frame.usage.completion_tokens} tokens`);
      break;
    case "run.error": {
      const item = answers.get(frame.run_id);
      item?.classList.add("failed");
      answers.delete(frame.run_id);
      setBusy(false, `The answer failed: ${frame.message}`);
      break;
    }
    case "error":
      pending = null;
      setBusy(false, `Error: ${frame.message}`);
      break;
    case "pong":
      break;
  }
}

function connect(): void {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/ws/v1/`);
  socket.addEventListener("open", () => {
    retry = 0;
    if (!pending) setBusy(false, "");
  });
  socket.addEventListener("message", (event: MessageEvent<string>) => {
    handle(JSON.parse(event.data) as ServerFrame);
  });
  socket.addEventListener("close", () => {
    socket = null;
    setBusy(true, "Disconnected; reconnecting…");
    retry = Math.min(retry + 1, 6);
    window.setTimeout(connect, 250 * 2 ** retry);
  });
}

function send(content: string): void {
  if (!socket || socket.readyState !== WebSocket.OPEN) {
    setBusy(false, "Not connected yet; try again in a moment.");
    return;
  }
  const clientId = crypto.randomUUID();
  pending = { content, clientId };
  addMessage("user", content);
  socket.send(
    JSON.stringify({
      type: "chat.send",
      client_id: clientId,
      content,
      ...(conversationId ? { conversation_id: conversationId } : {}),
    }),
  );
  setBusy(true, "Sending…");
}

const initial = JSON.parse(document.getElementById("parley-thread")?.textContent ?? "[]") as ThreadMessage[];
for (const message of initial) addMessage(message.role, message.content);

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const content = prompt.value.trim();
  if (!content) return;
  prompt.value = "";
  send(content);
});
prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    form.requestSubmit();
  }
});

connect();
