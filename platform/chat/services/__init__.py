"""Writes to chat data: runs (sending, regenerating, cancelling) and conversations
(renaming, deleting, switching branches, titles). Import from the submodules."""
