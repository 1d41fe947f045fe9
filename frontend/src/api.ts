// The REST API (docs/rest-api.md) with the member's session. Django checks the CSRF
// token on unsafe methods; the page carries it (read from the DOM, which works whether
// or not the token cookie is readable by scripts).

import type {
  BranchStepOut,
  ConversationOut,
  MessageOut,
  MessageTreeOut,
  SearchHitOut,
  SearchOut,
  StepArtifactOut,
  ToolStepOut,
} from "./api.gen";

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

// The REST schemas are generated (api.gen.ts, by tests/gen_types.py), named here as the
// page knows them.
export type Conversation = ConversationOut;
export type ToolStep = ToolStepOut;
export type StepArtifact = StepArtifactOut;
export type TreeMessage = MessageOut;
export type TreeStep = BranchStepOut;
export type MessageTree = MessageTreeOut;
export type SearchHit = SearchHitOut;

const SAFE_METHODS = new Set(["GET", "HEAD", "OPTIONS"]);

export class Api {
  constructor(
    private readonly base: string,
    private readonly csrfToken: string,
  ) {}

  private async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    const headers: Record<string, string> = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (!SAFE_METHODS.has(method)) headers["X-CSRFToken"] = this.csrfToken;
    const response = await fetch(this.base + path, {
      method,
      headers,
      credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (!response.ok) {
      let detail = `${response.status} ${response.statusText}`;
      try {
        const data = (await response.json()) as { detail?: unknown };
        if (typeof data.detail === "string") detail = data.detail;
      } catch {
        // Not JSON (a proxy's error page): the status says enough.
      }
      throw new ApiError(response.status, detail);
    }
    if (response.status === 204) return undefined as T;
    return (await response.json()) as T;
  }

  exportUrl(conversationId: string, format: "markdown" | "json"): string {
    return `${this.base}conversations/${encodeURIComponent(conversationId)}/export?format=${format}`;
  }

  messages(conversationId: string): Promise<MessageTree> {
    return this.call("GET", `conversations/${encodeURIComponent(conversationId)}/messages`);
  }

  switchBranch(conversationId: string, messageId: string): Promise<MessageTree> {
    return this.call("PUT", `conversations/${encodeURIComponent(conversationId)}/branch`, {
      message_id: messageId,
    });
  }

  rename(conversationId: string, title: string): Promise<Conversation> {
    return this.call("PATCH", `conversations/${encodeURIComponent(conversationId)}`, { title });
  }

  remove(conversationId: string): Promise<void> {
    return this.call("DELETE", `conversations/${encodeURIComponent(conversationId)}`);
  }

  search(query: string): Promise<SearchOut> {
    return this.call("GET", `conversations/search?q=${encodeURIComponent(query)}&limit=20`);
  }
}
