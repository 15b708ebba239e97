"""The receive side: inbox -> checks -> database -> ack."""
