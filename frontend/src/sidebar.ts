// The conversation list: live titles, rename, delete (after a confirmation), exports,
// and search over the member's messages.

import { type Api, ApiError, type SearchHit } from "./api";
import { button, el, required } from "./dom";

export interface SidebarOptions {
  api: Api;
  conversationUrl: string;
  currentId: () => string | null;
  // The open conversation was deleted (here or elsewhere).
  openDeleted: () => void;
  say: (message: string) => void;
}

const SEARCH_DELAY_MS = 250;

export class Sidebar {
  private readonly list = required<HTMLUListElement>("#conversation-list");
  private readonly template = required<HTMLTemplateElement>("#conversation-entry");
  private readonly searchForm = required<HTMLFormElement>("#search");
  private readonly searchInput = required<HTMLInputElement>("#search-q");
  private readonly results = required<HTMLDivElement>("#search-results");
  private readonly summary = required<HTMLParagraphElement>("#search-summary");
  private readonly hits = required<HTMLOListElement>("#search-hits");
  private searchGeneration = 0;
  private searchTimer: number | undefined;

  constructor(private readonly options: SidebarOptions) {
    this.list.addEventListener("click", (event) => this.onClick(event));
    // One "⋯" menu open at a time; it closes on Escape, on a click elsewhere and after
    // its action (onClick).
    this.list.addEventListener(
      "toggle",
      (event) => {
        const menu = event.target as HTMLDetailsElement;
        if (menu.matches?.("details.menu") && menu.open) this.closeMenus(menu);
      },
      true, // (toggle does not bubble)
    );
    document.addEventListener("keydown", (event) => {
      if (event.key !== "Escape") return;
      const open = this.openMenus();
      if (!open.length) return;
      const focused = open.find((menu) => menu.contains(document.activeElement));
      this.closeMenus();
      focused?.querySelector("summary")?.focus();
    });
    document.addEventListener("pointerdown", (event) => {
      const target = event.target as Node;
      this.closeMenus(this.openMenus().find((menu) => menu.contains(target)));
    });
    document.addEventListener("focusin", (event) => {
      const target = event.target as Node;
      this.closeMenus(this.openMenus().find((menu) => menu.contains(target)));
    });
    this.searchForm.addEventListener("submit", (event) => {
      event.preventDefault();
      window.clearTimeout(this.searchTimer);
      void this.search();
    });
    this.searchInput.addEventListener("input", () => {
      window.clearTimeout(this.searchTimer);
      this.searchTimer = window.setTimeout(() => void this.search(), SEARCH_DELAY_MS);
    });
    this.searchInput.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        this.searchInput.value = "";
        void this.search();
      }
    });
  }

  private openMenus(): HTMLDetailsElement[] {
    return [...this.list.querySelectorAll<HTMLDetailsElement>("details.menu[open]")];
  }

  // Closes every open menu but `keep`.
  private closeMenus(keep?: HTMLDetailsElement): void {
    for (const menu of this.openMenus()) if (menu !== keep) menu.open = false;
  }

  private entry(id: string): HTMLLIElement | null {
    for (const item of this.list.querySelectorAll<HTMLLIElement>("li[data-conversation-id]")) {
      if (item.dataset.conversationId === id) return item;
    }
    return null;
  }

  private titleOf(item: HTMLLIElement): string {
    return item.querySelector(".title")?.textContent ?? "";
  }

  // A new entry at the top (a conversation started here or in another tab).
  add(id: string, title: string): HTMLLIElement {
    const existing = this.entry(id);
    if (existing) return existing;
    const item = (this.template.content.firstElementChild as HTMLLIElement).cloneNode(true) as HTMLLIElement;
    item.dataset.conversationId = id;
    const link = required<HTMLAnchorElement>("a.title", item);
    link.href = `${this.options.conversationUrl}${id}/`;
    required<HTMLAnchorElement>("a[data-export=markdown]", item).href = this.options.api.exportUrl(id, "markdown");
    required<HTMLAnchorElement>("a[data-export=json]", item).href = this.options.api.exportUrl(id, "json");
    if (id === this.options.currentId()) {
      item.classList.add("current");
      link.setAttribute("aria-current", "page");
    }
    this.list.prepend(item);
    this.setTitle(id, title);
    return item;
  }

  setTitle(id: string, title: string): void {
    const item = this.entry(id) ?? this.add(id, title);
    const shown = title || "Untitled";
    const link = item.querySelector(".title");
    if (link) link.textContent = shown;
    item.querySelector("summary")?.setAttribute("aria-label", `Actions for ${shown}`);
  }

  markCurrent(id: string): void {
    for (const item of this.list.querySelectorAll<HTMLLIElement>("li[data-conversation-id]")) {
      const current = item.dataset.conversationId === id;
      item.classList.toggle("current", current);
      const link = item.querySelector(".title");
      if (current) link?.setAttribute("aria-current", "page");
      else link?.removeAttribute("aria-current");
    }
  }

  remove(id: string): void {
    this.entry(id)?.remove();
    for (const hit of this.hits.querySelectorAll<HTMLLIElement>("li")) {
      if (hit.dataset.conversationId === id) hit.remove();
    }
  }

  private onClick(event: Event): void {
    const target = event.target as HTMLElement;
    // An export downloads in place: the menu has done its job.
    const exported = target.closest<HTMLAnchorElement>("a[data-export]");
    if (exported) {
      const menu = exported.closest<HTMLDetailsElement>("details.menu");
      // (after the click's own default action, the download, has started)
      if (menu) window.setTimeout(() => (menu.open = false));
      return;
    }
    const action = target.closest<HTMLButtonElement>("button[data-action]");
    const item = target.closest<HTMLLIElement>("li[data-conversation-id]");
    if (!action || !item?.dataset.conversationId) return;
    const id = item.dataset.conversationId;
    item.querySelector("details")?.removeAttribute("open");
    if (action.dataset.action === "rename") this.startRename(item, id);
    else if (action.dataset.action === "delete") void this.delete(item, id);
  }

  private startRename(item: HTMLLIElement, id: string): void {
    const link = item.querySelector<HTMLAnchorElement>("a.title");
    if (!link || item.querySelector("form.rename")) return;
    const form = el("form", { class: "rename" });
    const input = el("input", { type: "text", maxlength: "200", "aria-label": "New title", required: "" });
    input.value = this.titleOf(item);
    const save = el("button", { type: "submit" }, "Save");
    const cancel = button("cancel-rename", "Cancel");
    form.append(input, save, cancel);
    link.hidden = true;
    link.after(form);
    input.focus();
    input.select();
    const close = () => {
      form.remove();
      link.hidden = false;
    };
    cancel.addEventListener("click", close);
    input.addEventListener("keydown", (event) => {
      if (event.key === "Escape") close();
    });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const title = input.value.trim();
      if (!title) return;
      save.disabled = true;
      try {
        const conversation = await this.options.api.rename(id, title);
        this.setTitle(id, conversation.title);
        close();
        this.options.say(`Renamed to ${conversation.title}.`);
      } catch (error) {
        save.disabled = false;
        this.options.say(`Could not rename: ${describe(error)}`);
      }
    });
  }

  private async delete(item: HTMLLIElement, id: string): Promise<void> {
    const title = this.titleOf(item);
    if (!window.confirm(`Delete “${title}” with all its messages? This cannot be undone.`)) return;
    try {
      await this.options.api.remove(id);
    } catch (error) {
      // Gone already (another tab deleted it): the outcome the member asked for.
      if (!(error instanceof ApiError && error.status === 404)) {
        this.options.say(`Could not delete: ${describe(error)}`);
        return;
      }
    }
    this.deleted(id);
    this.options.say(`Deleted ${title}.`);
  }

  deleted(id: string): void {
    this.remove(id);
    if (id === this.options.currentId()) this.options.openDeleted();
  }

  private async search(): Promise<void> {
    const query = this.searchInput.value.trim();
    const generation = ++this.searchGeneration;
    if (!query) {
      this.results.hidden = true;
      this.list.hidden = false;
      this.hits.replaceChildren();
      return;
    }
    this.results.hidden = false;
    this.list.hidden = true;
    this.summary.textContent = "Searching…";
    let items: SearchHit[];
    try {
      items = (await this.options.api.search(query)).items;
    } catch (error) {
      if (generation === this.searchGeneration) this.summary.textContent = `Search failed: ${describe(error)}`;
      return;
    }
    if (generation !== this.searchGeneration) return; // a newer query is on its way
    this.summary.textContent = items.length
      ? `${items.length} conversation${items.length === 1 ? "" : "s"} found`
      : "No conversation matches.";
    this.hits.replaceChildren(...items.map((hit) => this.hitElement(hit)));
  }

  private hitElement(hit: SearchHit): HTMLLIElement {
    const item = el("li", { "data-conversation-id": hit.conversation.id });
    const link = el("a", { href: `${this.options.conversationUrl}${hit.conversation.id}/` });
    link.textContent = hit.conversation.title || "Untitled";
    item.append(link);
    if (hit.snippet) item.append(snippetElement(hit.snippet));
    return item;
  }
}

// The snippet is plain text with matches marked **like this**: the marks become <mark>
// elements, everything else stays text.
function snippetElement(snippet: string): HTMLParagraphElement {
  const paragraph = el("p", { class: "snippet" });
  snippet.split("**").forEach((part, index) => {
    if (!part) return;
    paragraph.append(index % 2 === 1 ? el("mark", {}, part) : document.createTextNode(part));
  });
  return paragraph;
}

export function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
