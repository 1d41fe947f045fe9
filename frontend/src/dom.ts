// Small DOM helpers. Text from the server or the model is only ever set as text.

export function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string> = {},
  text?: string,
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

export function button(action: string, label: string, ariaLabel?: string): HTMLButtonElement {
  const node = el("button", { type: "button", "data-action": action }, label);
  if (ariaLabel) node.setAttribute("aria-label", ariaLabel);
  return node;
}

export function required<T extends Element>(selector: string, root: ParentNode = document): T {
  const node = root.querySelector<T>(selector);
  if (!node) throw new Error(`The page lacks ${selector}`);
  return node;
}
