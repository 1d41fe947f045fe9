"""The agent runtime (DESIGN section 6): LangChain agents whose chat model calls the
inference pool, every step logged as a run event. Built on the chat issue's run log;
nothing here yet."""
