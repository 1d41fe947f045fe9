// The REST API (docs/rest-api.md) with the member's session. Django checks the CSRF
// token on unsafe methods; the page carries it (read from the DOM, which works whether
// or not the token cookie is readable by scripts).

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

export interface Conversation {
  id: string;
  title: string;
  title_auto: boolean;
  current_leaf_id: string | null;
  updated_at: string;
}

// A tool call stored with an agent's answer (a message's `steps`).
export interface ToolStep {
  call_id: string;
  name: string;
  arguments: unknown;
  result: string | null;
  error: string | null;
  truncated: boolean;
}

export interface TreeMessage {
  id: string;
  parent_id: string | null;
  role: string;
  content: string;
  steps: ToolStep[];
}

export interface TreeStep {
  message_id: string;
  role: string;
  sibling_ids: string[];
  sibling_index: number;
  sibling_count: number;
}

export interface MessageTree {
  conversation_id: string;
  current_leaf_id: string | null;
  messages: TreeMessage[];
  branch: TreeStep[];
}

export interface SearchHit {
  conversation: Conversation;
  rank: number;
  message_id: string | null;
  role: string | null;
  snippet: string;
}

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

  search(query: string): Promise<{ query: string; items: SearchHit[] }> {
    return this.call("GET", `conversations/search?q=${encodeURIComponent(query)}&limit=20`);
  }
}
