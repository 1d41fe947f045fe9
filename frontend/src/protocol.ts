// Frames of websocket protocol v1 (server to client) that this page handles.

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

export type ServerFrame =
  | { type: "run.started"; run_id: string; conversation_id: string; user_message_id: string; client_id?: string }
  | { type: "token"; run_id: string; seq: number; delta: string }
  | { type: "run.done"; run_id: string; seq: number; message_id: string; finish_reason: string; usage: Usage }
  | { type: "run.error"; run_id: string; seq: number; code: string; message: string }
  | { type: "error"; code: string; message: string; client_id?: string }
  | { type: "pong"; client_id?: string };
