"""The coordinator: a pure job state machine (`job`) behind a thin gRPC shell (`server`)."""
