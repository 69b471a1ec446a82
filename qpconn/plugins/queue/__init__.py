"""Queue plugins: where an accepted message goes (``queue/maildir``, ``queue/discard`` ...)."""
