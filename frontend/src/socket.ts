// One websocket to /ws/v1/ that reconnects by itself (with backoff) until access ends.

import type { ClientFrame, ServerFrame } from "./protocol";

// Close codes after which reconnecting cannot help (docs/protocol.md).
const CLOSE_UNAUTHENTICATED = 4401;
const CLOSE_FORBIDDEN = 4403;
const MAX_BACKOFF_STEP = 5;

export interface SocketHandlers {
  frame(frame: ServerFrame): void;
  // Called on every (re)connection: resend what must survive a lost connection.
  open(): void;
  closed(final: boolean): void;
}

export class ChatSocket {
  private socket: WebSocket | null = null;
  private attempt = 0;
  private stopped = false;

  constructor(
    private readonly url: string,
    private readonly handlers: SocketHandlers,
  ) {}

  get isOpen(): boolean {
    return this.socket?.readyState === WebSocket.OPEN;
  }

  connect(): void {
    const socket = new WebSocket(this.url);
    this.socket = socket;
    socket.addEventListener("open", () => {
      this.attempt = 0;
      this.handlers.open();
    });
    socket.addEventListener("message", (event: MessageEvent<string>) => {
      let frame: ServerFrame;
      try {
        frame = JSON.parse(event.data) as ServerFrame;
      } catch {
        return;
      }
      this.handlers.frame(frame);
    });
    socket.addEventListener("close", (event: CloseEvent) => {
      if (this.socket !== socket) return;
      this.socket = null;
      const final = event.code === CLOSE_UNAUTHENTICATED || event.code === CLOSE_FORBIDDEN;
      this.stopped = this.stopped || final;
      this.handlers.closed(this.stopped);
      if (this.stopped) return;
      this.attempt = Math.min(this.attempt + 1, MAX_BACKOFF_STEP);
      const delay = 250 * 2 ** this.attempt * (0.75 + Math.random() / 2);
      window.setTimeout(() => this.connect(), delay);
    });
  }

  // False when not connected: the caller keeps what it must resend on `open`.
  send(frame: ClientFrame): boolean {
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN) return false;
    this.socket.send(JSON.stringify(frame));
    return true;
  }
}
