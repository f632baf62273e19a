"""Generated protobuf / gRPC stubs (committed; regenerate with `make proto`)."""
