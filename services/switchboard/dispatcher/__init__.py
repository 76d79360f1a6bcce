"""The DispatcherService: runs, routing, handlers and streamed answers."""
