// Websocket protocol v1 (docs/asyncapi.yaml): the frames this page sends and handles.

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

export type ClientFrame =
  | {
      type: "chat.send";
      content: string;
      conversation_id?: string;
      // Left out: the tip of the current branch; null: a new root (an edit of the first message).
      parent_message_id?: string | null;
      // "<plugin>.<agent>": that agent answers from now on; "none": plain chat; left out: as before.
      agent?: string;
      client_id: string;
    }
  | { type: "chat.regenerate"; message_id: string; client_id: string }
  | { type: "run.cancel"; run_id: string; client_id?: string }
  | { type: "run.attach"; run_id: string; after: number; client_id?: string }
  | { type: "ping"; client_id?: string };

export type SendFrame = Extract<ClientFrame, { type: "chat.send" | "chat.regenerate" }>;

export type RunEventFrame =
  | { type: "token"; run_id: string; seq: number; delta: string }
  | { type: "tool.start"; run_id: string; seq: number; call_id: string; name: string; arguments?: unknown }
  | {
      type: "tool.end";
      run_id: string;
      seq: number;
      call_id: string;
      name: string;
      result?: string;
      error?: string | null;
      truncated?: boolean;
    }
  | {
      type: "progress";
      run_id: string;
      seq: number;
      stage: string;
      message?: string;
      done?: number;
      total?: number;
    }
  | {
      type: "run.done";
      run_id: string;
      seq: number;
      message_id: string | null;
      finish_reason: string;
      usage: Usage;
      trimmed?: boolean;
    }
  | {
      type: "run.error";
      run_id: string;
      seq: number;
      code: string;
      message: string;
      message_id: string | null;
      trimmed?: boolean;
    };

export type ServerFrame =
  | RunEventFrame
  | { type: "run.started"; run_id: string; conversation_id: string; user_message_id: string; client_id?: string }
  | { type: "run.cancelling"; run_id: string; state: string; client_id?: string }
  | {
      type: "conversation.updated";
      conversation_id: string;
      title?: string;
      title_auto?: boolean;
      current_leaf_id?: string | null;
      deleted?: boolean;
      updated_at?: string;
    }
  | { type: "error"; code: string; message: string; client_id?: string }
  | { type: "pong"; client_id?: string };

export function isRunEvent(frame: ServerFrame): frame is RunEventFrame {
  return "seq" in frame && "run_id" in frame;
}
