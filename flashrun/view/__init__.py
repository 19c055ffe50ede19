"""The job's live terminal view: `render` (pure, snapshot in, rich renderable out) and its drivers (`live`)."""
