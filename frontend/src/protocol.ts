// Websocket protocol v1 (docs/asyncapi.yaml): the frames this page sends and handles.
// The frame types are generated (protocol.gen.ts, by tests/gen_types.py).

import type { ClientFrame, ServerFrame } from "./protocol.gen";

export type { ClientFrame, ServerFrame, Usage } from "./protocol.gen";

// The page gives every send a client id (it matches the answer to the pending message).
export type SendFrame = Extract<ClientFrame, { type: "chat.send" | "chat.regenerate" }> & {
  client_id: string;
};

// The frames of a run's event log: each carries its sequence number.
export type RunEventFrame = Extract<ServerFrame, { seq: number }>;

export function isRunEvent(frame: ServerFrame): frame is RunEventFrame {
  return "seq" in frame && "run_id" in frame;
}
